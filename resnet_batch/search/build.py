"""build module: the streaming index build: sample, train, add chunk by chunk, tune nprobe, write the folder.

Memory is bounded by the codes, not by the raw vectors: pass 1 keeps only a sample (float16) to train the
projection and the lists; pass 2 reads the parts in chunks of CHUNK_ROWS, adds them with 64-bit ids, writes
their id-map rows, and folds them into the exact top-k of the tuning queries; then nprobe is tuned on those
queries (database rows, each one's own match left out, as the neighbours job sees them).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.cluster import worker_uri
from resnet_batch.search.embeddings import Part, duplicate_id, input_root, ok_chunks, sample_rows, scan_embeddings
from resnet_batch.errors import SimilarityIndexError
from resnet_batch.search.index import FORMAT, IDS_FILE, IDS_SCHEMA, INDEX_FILE, REFINE_FILE, normalize, \
    Refiner, refined_search
from resnet_batch.search.changes import part_stamps
from resnet_batch.search.coders import TransformCoder, write_coder
from resnet_batch.search.folder import Staging
from resnet_batch.search.layout import HASH_FILE, id_hashes, write_id_lookup
from resnet_batch.search.spec import (DEFAULT_MAX_MEMORY, FLAT_MAX, PCA_AUTO, PCA_TRAIN_MAX, TUNE_QUERIES, IndexOptions,
                                     IndexSpec, query_node_line, resolve_pca)
from resnet_batch.schema import EMBEDDING_DIM, embeddings_to_numpy
from resnet_batch.search.tuning import ExactTopK, Tuning, drop_self, matmul_t, recalls, tune_nprobe

TUNE_K = 10
COLUMNS = ["image_id", "path", "topk_labels", "topk_probs", "embedding"]  # what adding a row reads


LOG = logging.getLogger(__name__)  # a build's progress lines (INFO, see resnet_batch.logs); its result line is printed


def build_index(uris: Sequence[str], out: str, *, kind: str = "auto", max_memory: int = DEFAULT_MAX_MEMORY,
                pca: Optional[int] = None, flat_max: int = FLAT_MAX, target_recall: float = 0.95,
                tune_queries: int = TUNE_QUERIES, seed: int = 0, refine_code: str = "FP16",
                storage_options: Optional[dict] = None, log: Callable[[str], None] = LOG.info,
                guard: Optional[Callable[[], None]] = None) -> dict:
    """Index every 'ok' embedding under `uris` (one provenance) into the folder `out`; returns its index.json.
    `guard`: the folder lock's check, before publishing (folder.Staging)."""
    options = IndexOptions(kind=kind, max_memory=max_memory, pca=pca, flat_max=flat_max,
                           target_recall=target_recall, tune_queries=tune_queries, seed=seed, refine_code=refine_code)
    options.check()
    opts = dict(storage_options or {})
    source = BuildSource.scan(uris, options, opts)
    with Staging(out, opts, guard=guard) as stage:
        meta = build_into(stage, source, options, opts, log)
        meta["history"] = [history_entry(meta, "build", "new index", meta["build_s"])]
        stage.publish(meta)
    return meta


@dataclass(frozen=True)
class BuildSource:
    """What a build indexes, checked before any work: the parts (stamped), their provenance, the spec."""

    uris: tuple
    parts: list  # [(fs, Part)]
    stamps: dict  # part uri -> stamp (changes.part_stamps)
    provenance: dict
    spec: IndexSpec
    scan_s: float
    hashes: np.ndarray  # layout.id_hashes of every ok row, in scan order (= id-map row order)

    @property
    def count(self) -> int:
        return sum(p.ok_rows for _, p in self.parts)

    @classmethod
    def scan(cls, uris: Sequence[str], options: IndexOptions, opts: dict) -> "BuildSource":
        """Stamp and scan the parts under `uris`; refuse mixed provenance, a repeated image_id, no ok rows."""
        t0 = time.perf_counter()
        stamps = {p.uri: p.stamp for p in part_stamps(uris, opts)}  # before the parts: see part_stamps
        parts, provenance = scan_embeddings(uris, opts)
        hashes = check_unique_ids(parts)
        n = sum(p.ok_rows for _, p in parts)
        if n == 0:
            raise SimilarityIndexError(f"no embeddings with status 'ok' under {', '.join(uris)}")
        spec = IndexSpec.choose(n, kind=options.kind, dim=int(provenance.get("embedding_dim", EMBEDDING_DIM)),
                                max_memory=options.max_memory, pca=options.pca, flat_max=options.flat_max,
                                target_recall=options.target_recall, refine_code=options.refine_code)
        return cls(tuple(uris), parts, stamps, provenance, spec, time.perf_counter() - t0, hashes)


def build_into(stage: Staging, source: BuildSource, options: IndexOptions, opts: dict,
               log: Callable[[str], None] = LOG.info) -> dict:
    """Build the index in `stage` (its data files, named as in a fresh folder); returns its index.json, but for
    "files" and "history", which publishing adds."""
    import faiss

    t0 = time.perf_counter() - source.scan_s
    uris, parts, provenance, spec, n = source.uris, source.parts, source.provenance, source.spec, source.count
    dim = spec.dim
    queries = min(options.tune_queries, n) if spec.kind == "ivf" else 0
    log(f"indexing {n} embeddings from {len(parts)} parts (scanned in {source.scan_s:.1f} s): {spec.factory}")
    t_sample = time.perf_counter()
    train, tune_ids, tune_vectors = _read_sample(parts, spec.train_size, queries, dim, options.seed)
    t_train = time.perf_counter()
    index, pca_info, spec = _trained_index(spec, train, options.seed, n, options)
    refiner = _trained_refiner(train, code=spec.refine_code) if spec.refine else None
    del train
    train_s = time.perf_counter() - t_train
    log(f"read a sample of {spec.train_size} + {queries} vectors in {t_train - t_sample:.1f} s, trained "
        f"{spec.factory} in {train_s:.1f} s; adding ({spec.bytes_per_vector()} bytes a vector in memory: "
        f"{n * spec.bytes_per_vector() / 2**30:.2f} GiB" + (f", {refiner.sa_code_size()} on disk for re-ranking)"
                                                            if refiner is not None else ")"))
    exact = ExactTopK(tune_vectors, TUNE_K + 1)
    t_add = time.perf_counter()
    with IdMapWriter(stage.path(IDS_FILE), stage.path(REFINE_FILE), refiner) as sink:
        next_id, roots = add_parts([(fs, part, i, None) for i, (fs, part) in enumerate(parts)], index, sink, 0,
                                   exact)
    add_s = time.perf_counter() - t_add
    t_tune = time.perf_counter()
    search = _searcher(index, spec, refiner, stage.path(REFINE_FILE))
    tuning = tune_index(index, search, tune_ids, tune_vectors, exact, spec.nlist, options.target_recall) \
        if queries else None
    log(f"added in {add_s:.1f} s" + (f", tuned nprobe={tuning.nprobe} (recall@{TUNE_K} {tuning.recall:.4f}) "
                                     f"in {time.perf_counter() - t_tune:.1f} s" if tuning else ""))

    faiss.write_index(index, stage.path(INDEX_FILE))
    write_id_lookup(stage.path(HASH_FILE), source.hashes)
    if refiner is not None:
        write_coder(refiner, stage.path)
    meta = {
        "format": FORMAT, "build_id": uuid.uuid4().hex, "generation": 0, "kind": spec.kind, "factory": spec.factory,
        "spec": spec.as_dict(), "metric": "cosine", "count": int(index.ntotal), "dim": dim, "next_id": next_id,
        "nprobe": tuning.nprobe if tuning else None,
        "tuning": tuning.as_dict() if tuning else {"exact": True, f"recall_at_{TUNE_K}": 1.0},
        "pca": pca_info, "max_memory": options.max_memory, "train_size": spec.train_size, "seed": options.seed,
        "options": options.as_dict(), "trained_count": n, "tuned_count": n if tuning else None,
        "provenance": provenance, "parts": len(parts),
        "sources": [worker_uri(u) for u in uris],  # absolute: neighbors and gallery read them from any folder
        "part_uris": [p.uri for _, p in parts], "part_stamps": [source.stamps.get(p.uri) for _, p in parts],
        "image_roots": image_roots(uris, opts, roots),
        "sample_s": round(t_train - t_sample, 3), "train_s": round(train_s, 3), "add_s": round(add_s, 3),
        "faiss": faiss.__version__, "built_at": time.time(),
    }
    if spec.kind == "ivf":
        meta["query_node"] = spec.query_memory(n, os.path.getsize(stage.path(IDS_FILE)),
                                               os.path.getsize(stage.path(REFINE_FILE)))
        log(query_node_line(meta["query_node"]))
    meta["build_s"] = round(time.perf_counter() - t0, 3)
    if tuning and not tuning.met:
        log(f"warning: recall@{TUNE_K} {tuning.recall:.3f} even at nprobe={tuning.nprobe}: below the target "
            f"{options.target_recall}; raise --max-memory or --pca (or --pca 0), or lower --target-recall")
    return meta


def history_entry(meta: dict, action: str, reason: str, seconds: float, **counts) -> dict:
    """One entry of index.json "history": what a build, rebuild or update did, when, why, and how long it took."""
    return {"action": action, "at": round(time.time(), 3), "reason": reason, "generation": meta["generation"],
            "count": meta["count"], "nprobe": meta["nprobe"], "seconds": seconds, **counts}


def part_id_hashes(fs, part: Part) -> np.ndarray:
    """The id hashes of a part's ok rows, in row order."""
    chunks = [id_hashes(c.column("image_id").to_pylist()) for c in ok_chunks(fs, part.path, ["image_id"])]
    return np.concatenate(chunks) if chunks else np.empty(0, np.int64)


def check_unique_ids(parts: list[tuple], hashes: Optional[list] = None) -> np.ndarray:
    """Refuse an image_id that appears twice among the ok rows (before any work; 8 bytes a row of hashes);
    `hashes`: each part's part_id_hashes where they were computed already (in parallel). Returns the hashes
    of every ok row in scan order (the id map's row order: the build writes them as its lookup)."""
    hashes = [part_id_hashes(fs, part) for fs, part in parts] if hashes is None else hashes
    if not hashes:
        return np.empty(0, np.int64)
    h = np.concatenate(hashes)
    owner = np.concatenate([np.full(len(x), i, dtype=np.int32) for i, x in enumerate(hashes)])
    order = np.argsort(h, kind="stable")
    same = np.flatnonzero(h[order][1:] == h[order][:-1])
    if not len(same):
        return h
    wanted = set(h[order][same].tolist())
    seen: dict[str, str] = {}
    for i in sorted(set(owner[order][same].tolist()) | set(owner[order][same + 1].tolist())):
        fs, part = parts[i]
        for image_id in _ids_with_hashes(fs, part, wanted):
            if image_id in seen:
                duplicate_id(image_id, seen[image_id], part.uri)
            seen[image_id] = part.uri
    return h  # two ids with one hash: both indexed, the lookup compares the strings


def _ids_with_hashes(fs, part: Part, wanted: set) -> list[str]:
    return [s for chunk in ok_chunks(fs, part.path, ["image_id"]) for s in chunk.column("image_id").to_pylist()
            if int(id_hashes([s])[0]) in wanted]


def _read_sample(parts: list[tuple], train_size: int, queries: int, dim: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1: two uniform samples of ok rows: `train_size` to train on (float16) and `queries` tuning queries
    (float32, with their ids: their ok-row numbers in scan order, as pass 2 assigns them)."""
    counts = [p.ok_rows for _, p in parts]
    picks = zip(sample_rows(counts, train_size, seed), sample_rows(counts, queries, seed + 1))
    train = np.empty((min(train_size, sum(counts)), dim), dtype=np.float16)
    tune = np.empty((min(queries, sum(counts)), dim), dtype=np.float32)
    tune_ids = np.empty(len(tune), dtype=np.int64)
    nt, nq, offset = 0, 0, 0
    for (fs, part), (t_rows, q_rows) in zip(parts, picks):
        if len(t_rows) or len(q_rows):
            start = 0
            for chunk in ok_chunks(fs, part.path, ["embedding"]):
                end = start + len(chunk)
                for rows, is_query in ((t_rows, False), (q_rows, True)):
                    sel = rows[(rows >= start) & (rows < end)]
                    if not len(sel):
                        continue
                    vec = normalize(embeddings_to_numpy(chunk.column("embedding").take(pa.array(sel - start))))
                    if is_query:
                        tune[nq:nq + len(sel)], tune_ids[nq:nq + len(sel)] = vec, offset + sel
                        nq += len(sel)
                    else:
                        train[nt:nt + len(sel)] = vec
                        nt += len(sel)
                start = end
        offset += part.ok_rows
    return train, tune_ids, tune


def _trained_index(spec: IndexSpec, train: np.ndarray, seed: int, n: int, options: IndexOptions):
    """An empty, trained FAISS inner-product index for `spec`; returns (index, projection figures, final spec:
    with the projection resolved, its codes chosen again for the stored dimensions)."""
    import faiss

    if spec.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(spec.dim)), None, spec
    pca_info, transform, sample = None, None, train
    if spec.pca:
        transform, pca_info = fit_projection(train[:PCA_TRAIN_MAX], spec.pca)
        spec = IndexSpec.choose(n, kind="ivf", dim=spec.dim, max_memory=options.max_memory, pca=pca_info["dims"],
                                target_recall=options.target_recall, refine_code=options.refine_code)
        if transform is not None:
            sample = np.concatenate([project(transform, train[s:s + 65536]) for s in range(0, len(train), 65536)])
    d = spec.stored_dim
    quantizer = faiss.IndexFlatIP(d)
    if spec.code.startswith("SQ"):
        qtype = faiss.ScalarQuantizer.QT_8bit if spec.code == "SQ8" else faiss.ScalarQuantizer.QT_4bit
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, d, spec.nlist, qtype, faiss.METRIC_INNER_PRODUCT)
    else:
        ivf = faiss.IndexIVFPQ(quantizer, d, spec.nlist, int(spec.code[2:]), 8, faiss.METRIC_INNER_PRODUCT)
        ivf.do_polysemous_training = False
        ivf.pq.cp.seed = seed
    ivf.cp.seed = seed
    ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
    quantizer.this.disown()
    ivf.own_fields = True
    if transform is None:
        return ivf, pca_info, spec
    index = faiss.IndexPreTransform(transform, ivf)
    transform.this.disown()
    ivf.this.disown()
    index.own_fields = True
    return index, pca_info, spec


def project(transform, x: np.ndarray) -> np.ndarray:
    """x through a LinearTransform without bias (its A matrix), in torch's BLAS."""
    import faiss

    a = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
    return matmul_t(x, a)


def fit_projection(sample: np.ndarray, dims: int):
    """An uncentred PCA (the top eigenvectors of E[x x^T]) as a FAISS LinearTransform with orthonormal rows.

    Uncentred, so that the inner product of two projections approximates theirs (PCAMatrix subtracts the mean,
    which would bias inner products by the mean's projection). dims PCA_AUTO: sized by resolve_pca from the
    share of the sample's variance (around its mean) that each number of dimensions keeps. Returns
    (transform or None, figures).
    """
    import faiss

    import torch

    x = np.asarray(sample, dtype=np.float32)
    t = torch.from_numpy(x)
    second = (t.T @ t).numpy().astype(np.float64) / len(x)  # float32 products, ample for the top components
    values, vectors = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(second)))  # LAPACK through torch
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    mean = x.mean(axis=0, dtype=np.float64)
    centred = second - np.outer(mean, mean)
    spread = (torch.from_numpy(centred) @ torch.from_numpy(vectors)).numpy()  # variance along each eigenvector
    kept = np.cumsum(np.sum(vectors * spread, axis=0)) / max(float(np.trace(centred)), 1e-30)
    auto = dims == PCA_AUTO
    if auto:
        dims = resolve_pca(kept.tolist(), x.shape[1])
    figures = {"auto": auto, "dims": dims, "fitted_on": len(x), "variance_kept": 1.0 if not dims else
               round(float(kept[dims - 1]), 6), **({"variance_kept_by": {str(d): round(float(kept[d - 1]), 6)
                                                                          for d in (64, 128, 256, 512, 1024)
                                                                          if d < len(kept)}} if auto else {})}
    if not dims:
        return None, figures
    a = np.ascontiguousarray(vectors[:, :dims].T, dtype=np.float32)
    lt = faiss.LinearTransform(x.shape[1], dims, False)
    faiss.copy_array_to_vector(a.ravel(), lt.A)
    lt.is_orthonormal = True
    lt.is_trained = True
    return lt, figures


def _trained_refiner(train: np.ndarray, dims: int = 0, code: str = "FP16"):
    """The codes of full vectors that re-ranking decodes: offsets from the mean (embeddings crowd around it, so
    the offsets carry what tells neighbours apart; spec.py says why not 8 bits of the raw vectors),
    projected onto the top `dims` principal directions of the offsets (0: all dimensions kept), stored as
    float16 ("FP16"), 8-, 6- or 4-bit numbers ("SQ8", "SQ6", "SQ4") or product-quantizer bytes ("PQ<m>");
    or the 1 KiB transform code "TC1024" (coders.TransformCoder)."""
    if code == "TC1024":
        return TransformCoder.trained(train[:PCA_TRAIN_MAX])
    import faiss

    import torch

    d = train.shape[1]
    sample = np.ascontiguousarray(train[:PCA_TRAIN_MAX], dtype=np.float32)
    chain = [faiss.CenteringTransform(d)]
    stored = d
    if dims and dims < d:
        centred = torch.from_numpy(sample - sample.mean(axis=0))
        values, vectors = torch.linalg.eigh((centred.T @ centred).double() / len(sample))
        top = vectors.numpy()[:, np.argsort(values.numpy())[::-1][:dims]]
        lt = faiss.LinearTransform(d, dims, False)
        faiss.copy_array_to_vector(np.ascontiguousarray(top.T, dtype=np.float32).ravel(), lt.A)
        lt.is_orthonormal = True
        lt.is_trained = True
        chain.append(lt)
        stored = dims
    if code.startswith("PQ"):  # PQ<m>: m sub-vectors of stored/m dimensions, a byte each
        sq = faiss.IndexPQ(stored, int(code[2:]), 8, faiss.METRIC_INNER_PRODUCT)
        sq.pq.cp.seed = 1234
    else:
        qtype = {"FP16": faiss.ScalarQuantizer.QT_fp16, "SQ8": faiss.ScalarQuantizer.QT_8bit,
                 "SQ6": faiss.ScalarQuantizer.QT_6bit, "SQ4": faiss.ScalarQuantizer.QT_4bit}[code]
        sq = faiss.IndexScalarQuantizer(stored, qtype, faiss.METRIC_INNER_PRODUCT)
    refiner = faiss.IndexPreTransform(sq)
    for transform in reversed(chain):  # applied in order: centre, then project
        refiner.prepend_transform(transform)
        transform.this.disown()
    sq.this.disown()
    refiner.own_fields = True
    refiner.train(sample)
    return refiner


def _searcher(index, spec: IndexSpec, refiner, codes_path: str):
    """search(q, k) -> (scores, ids) as SimilarityIndex will answer it (ids are rows in a fresh build)."""
    if refiner is None:
        return index.search
    decoder, rows = Refiner(refiner), RowFile(codes_path, refiner.sa_code_size())
    return lambda q, k: refined_search(index, decoder, rows, lambda ids: ids, q, k, spec.refine)


class RowFile:
    """Fixed-size rows of a file, read with pread: the build's tuning reads a few thousand rows of a file it has
    just written, all of it still in the page cache, where a memory map would fault its neighbours in too."""

    def __init__(self, path: str, row_bytes: int):
        self.path, self.row_bytes = path, row_bytes

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, r in enumerate(rows.tolist()):
                out[i] = np.frombuffer(os.pread(fd, self.row_bytes, r * self.row_bytes), dtype=np.uint8)
        finally:
            os.close(fd)
        return out


class IdMapWriter:
    """Writes the id map (Arrow IPC, in id order) and, for an IVF index, the re-ranking codes of the same rows."""

    def __init__(self, ids_path: str, codes_path: str, refiner=None):
        self.ids_path, self.codes_path, self.refiner = ids_path, codes_path, refiner

    def __enter__(self) -> "IdMapWriter":
        import pyarrow.ipc as ipc

        self._stack = contextlib.ExitStack()
        self.ids = self._stack.enter_context(ipc.new_file(self.ids_path, IDS_SCHEMA))
        self.codes = self._stack.enter_context(open(self.codes_path, "wb")) if self.refiner is not None else None
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def write(self, rows: pa.Table, vectors: Optional[np.ndarray] = None) -> None:
        """Id-map rows, and the codes of their (normalised) vectors where there are codes to write."""
        self.ids.write_table(rows)
        if self.codes is not None and vectors is not None:
            self.codes.write(self.refiner.sa_encode(vectors).tobytes())


def add_parts(parts: list[tuple], index, sink: IdMapWriter, first_id: int,
              exact: Optional[ExactTopK] = None) -> tuple[int, dict]:
    """Add the ok rows of parts [(fs, Part, part number, image_ids or None for all)] to `index` with fresh ids
    from `first_id` on, writing their id-map rows (and codes) to `sink` and folding them into `exact`. Returns
    the next free id and the protocols and common folder of the images (for the gallery's root check)."""
    next_id, protos, common = first_id, set(), None
    for fs, part, number, only in parts:
        for chunk in ok_chunks(fs, part.path, COLUMNS):
            if only is not None:
                chunk = chunk.filter(pc.is_in(chunk.column("image_id"), value_set=only))
                if not len(chunk):
                    continue
            ids = np.arange(next_id, next_id + len(chunk), dtype=np.int64)
            vec = normalize(embeddings_to_numpy(chunk.column("embedding")))
            add_vectors(index, vec, ids)
            if exact is not None:
                exact.add(vec, ids)
            sink.write(id_rows(chunk, ids, number), vec)
            next_id += len(chunk)
            protos, common = fold_folders(chunk.column("path"), protos, common)
    return next_id, {"protocols": sorted(protos), "common": common}


def add_vectors(index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Normalised vectors into a flat or IVF index under their ids (a projection applied here, in torch's BLAS,
    faster than FAISS's)."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        faiss.downcast_index(index.index).add_with_ids(
            project(faiss.downcast_VectorTransform(index.chain.at(0)), vectors), ids)
        index.ntotal = index.index.ntotal  # the adds went to the inner index
    else:
        index.add_with_ids(vectors, ids)


def id_rows(table: pa.Table, ids: np.ndarray, part: int) -> pa.Table:
    """The id-map rows (FAISS id, image_id, path, top-1 label and probability, part) of embedding rows."""
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "image_id": table.column("image_id"),
        "path": table.column("path"),
        "label": pc.list_element(table.column("topk_labels"), 0),
        "prob": pc.list_element(table.column("topk_probs"), 0),
        "part": pa.array(np.full(len(table), part, dtype=np.int32)),
    }, schema=IDS_SCHEMA)


def fold_folders(paths: pa.ChunkedArray, protos: set, common: Optional[str]) -> tuple[set, Optional[str]]:
    """Protocols seen so far and the deepest folder common to every path ("" when there is none), over the
    distinct folders of `paths` (cut in Arrow: a chunk of photos has few folders)."""
    from fsspec.core import split_protocol

    folders = set()
    for prefix in pc.unique(pc.replace_substring_regex(paths, pattern="[^/]*$", replacement="")).to_pylist():
        if prefix is not None:  # "dir/" for "dir/x.jpg": its dirname is the path's
            proto, bare = split_protocol(prefix)
            protos.add(proto or "file")
            folders.add(posixpath.dirname(bare))
    if folders:
        try:
            common = posixpath.commonpath([*folders, *([] if common is None else [common])])
        except ValueError:  # absolute and relative paths mixed, or already nothing in common
            common = ""
    return protos, common


def image_roots(uris: Sequence[str], opts: dict, found: dict) -> dict:
    """Where thumbnails may be read from: the embed outputs' recorded input roots, else the rows' common folder."""
    roots = [input_root(u, opts) for u in uris]
    if all(roots):
        return {"from": "manifest", "roots": [dict(r) for r in {json.dumps(r, sort_keys=True): r
                                                                for r in roots}.values()]}
    if len(found["protocols"]) == 1 and found["common"]:
        return {"from": "common-folder", "roots": [{"protocol": found["protocols"][0], "root": found["common"]}]}
    return {"from": "none", "roots": []}


def tune_index(index, search, tune_ids: np.ndarray, tune_vectors: np.ndarray, exact: ExactTopK, nlist: int,
               target: float) -> Tuning:
    """The smallest nprobe meeting the recall target on the tuning queries (left set on the index)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    _, exact_ids = exact.result()
    truth = drop_self(tune_ids, exact_ids, TUNE_K)

    def per_query_recall(nprobe: int) -> np.ndarray:
        ivf.nprobe = nprobe
        _, found = search(tune_vectors, TUNE_K + 1)
        return recalls(drop_self(tune_ids, found, TUNE_K), truth, TUNE_K)

    tuning = tune_nprobe(per_query_recall, nlist, target, TUNE_K)
    ivf.nprobe = tuning.nprobe
    return tuning
