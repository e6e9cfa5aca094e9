"""index module: an index folder (FAISS index, id map, index.json), opened memory-mapped and searched by cosine.

Folder layout (written by build.py, index.json last: a folder without it is incomplete):
  index.faiss  the FAISS index; every vector carries a 64-bit id (IndexIDMap2 or the inverted file's own ids)
  ids.arrow    the id map, Arrow IPC (uncompressed, memory-mappable): id, image_id, path, label, prob, part
  refine.f16   (IVF) row i of the id map as its re-ranking code: its float16 offset from the mean (FP16), or
               a 1 KiB transform code of it (TC1024)
  refine.faiss (IVF) the mean and the float16 coder that decode them; refine.coder for TC1024 (coders.py)
  index.json   kind, spec, tuned nprobe and its measured recall, counts, provenance, sources, image roots
An updated index keeps these files in generation folders that index.json names (layout.py).
The data files are memory-mapped, so the actors of one node share one copy in the page cache; from object
storage, the files FAISS, Arrow and numpy map are copied to a node-local cache folder (those index.json names,
once per node and generation: local_folder) and the re-ranking rows are read by range (layout.RangeRows).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from resnet_batch.errors import SimilarityIndexError
from resnet_batch.search.layout import (DATA_FILES, FORMAT, INDEX_FORMATS, IDS_FILE, INDEX_FILE,  # noqa: F401 (re-exported)
                                       META_FILE, REFINE_FILE, REFINE_SQ_FILE, generation_of, index_layout,
                                       open_id_lookup, open_refine_rows, read_faiss_index)
from resnet_batch.search.coders import TransformCoder, read_coder
from resnet_batch.storage import cache_dir, filesystem, protocols

OPEN_ATTEMPTS = 5  # opening again after index.json changed under a reader (each attempt: another publication)
IDS_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),  # the FAISS id (ascending)
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("label", pa.string()),  # top-1 label and probability
    pa.field("prob", pa.float32()),
    pa.field("part", pa.int32(), nullable=False),  # position in index.json "part_uris": the row's embed part
])


class UnknownImageId(SimilarityIndexError):
    """An image_id that the index does not hold."""


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a copy, float32); all-zero rows stay zero."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class SimilarityIndex:
    """A FAISS inner-product index over L2-normalised embeddings (inner product = cosine), its id map and meta."""

    def __init__(self, index, ids: pa.Table, meta: dict, refine: Optional[tuple] = None,
                 lookup: Optional[tuple] = None):
        if index.ntotal != len(ids):
            raise SimilarityIndexError(f"index holds {index.ntotal} vectors but the id map {len(ids)} rows")
        self.index, self.ids, self.meta = index, ids, meta
        self._refine = refine  # (Refiner, codes as bytes: codes[i] is id-map row i's), or None
        self._faiss_ids = ids.column("id").to_numpy()
        self._image_ids = ids.column("image_id")
        self._by_hash: Optional[tuple[np.ndarray, np.ndarray]] = lookup  # (sorted id hashes, their rows)
        self._direct_map = False
        if meta.get("nprobe"):
            self.set_nprobe(int(meta["nprobe"]))

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def provenance(self) -> dict:
        return self.meta["provenance"]

    def _ivf(self):
        import faiss

        try:
            return faiss.extract_index_ivf(self.index)
        except RuntimeError:
            return None

    def set_nprobe(self, nprobe: int) -> None:
        """Lists scanned per query (IVF only): index.json records the tuned value, applied on open."""
        ivf = self._ivf()
        if ivf is not None:
            ivf.nprobe = int(min(max(1, nprobe), ivf.nlist))

    @property
    def nprobe(self) -> Optional[int]:
        ivf = self._ivf()
        return None if ivf is None else int(ivf.nprobe)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k): cosine similarity, best first; id -1 where fewer than k exist."""
        q = normalize(np.atleast_2d(vectors))
        if q.shape[1] != self.index.d:
            raise SimilarityIndexError(f"query vectors have {q.shape[1]} dimensions, the index {self.index.d}")
        if self._refine is None:
            return self.index.search(q, int(k))
        return refined_search(self.index, *self._refine, self.rows_of, q, int(k), self.meta["spec"]["refine"])

    # -- the id map ------------------------------------------------------------------------------
    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers in the id map of FAISS ids (-1 for -1)."""
        return rows_in(self._faiss_ids, ids)

    def image_ids(self, ids: np.ndarray) -> np.ndarray:
        """image_id for each FAISS id (None for -1), same shape."""
        ids = np.asarray(ids)
        rows = self.rows_of(ids.ravel())
        valid = rows >= 0
        out = np.full(rows.shape, None, dtype=object)
        if valid.any():
            out[valid] = np.asarray(self._image_ids.take(pa.array(rows[valid])).to_pylist(), dtype=object)
        return out.reshape(ids.shape)

    def row(self, faiss_id: int) -> dict:
        """The id-map row of one FAISS id."""
        r = int(self.rows_of(np.array([faiss_id]))[0])
        if r < 0:
            raise SimilarityIndexError(f"id {faiss_id} is not in the index")
        return {c: self.ids.column(c)[r].as_py() for c in self.ids.column_names}

    def faiss_id(self, image_id: str) -> int:
        """The FAISS id of an indexed image: a sorted table of image_id hashes and their rows (16 bytes a row),
        memory-mapped from the folder's ids.hash (built here once for an index written before it existed)."""
        from resnet_batch.search.layout import id_hashes

        if self._by_hash is None:
            hashes = np.concatenate([id_hashes(c.to_pylist()) for c in self._image_ids.chunks] or
                                    [np.empty(0, np.int64)])
            order = np.argsort(hashes, kind="stable")
            self._by_hash = (hashes[order], order)
        hashes, order = self._by_hash
        h = int(id_hashes([image_id])[0])
        for i in range(np.searchsorted(hashes, h), np.searchsorted(hashes, h, side="right")):
            if self._image_ids[int(order[i])].as_py() == image_id:
                return int(self._faiss_ids[order[i]])
        raise UnknownImageId(f"image_id {image_id!r} is not in the index")

    def vector(self, image_id: str) -> np.ndarray:
        """The indexed vector of an image: exact for a flat index, else decoded from its re-ranking code (or
        from its IVF code where there is none)."""
        import faiss

        fid = self.faiss_id(image_id)
        if self._refine is not None:
            refiner, codes = self._refine
            return refiner.vectors(codes[self.rows_of(np.array([fid]))])[0]
        ivf = self._ivf()
        if ivf is not None and not self._direct_map:
            try:  # ids 0..n-1 (a fresh build): an array; after incremental edits: a hash table
                ivf.make_direct_map(True)
            except RuntimeError:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            self._direct_map = True
        return self.index.reconstruct(fid)

    # -- storage ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str, storage_options: Optional[dict] = None) -> "SimilarityIndex":
        """Open an index folder: both files memory-mapped (remote folders via the node-local cache).

        An update removes the generation before the one it replaces, so a reader that read index.json just
        before two updates published can find the files it names gone: when opening fails and index.json now
        names another version, it is opened again from that one (at most OPEN_ATTEMPTS times); a failure while
        index.json still names what was read is the folder's own and is raised."""
        meta = read_meta(uri, storage_options)
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            try:
                return cls._open(uri, meta, storage_options)
            except (SimilarityIndexError, OSError, RuntimeError) as err:  # RuntimeError: FAISS reading a file
                now = read_meta(uri, storage_options)
                if index_version(now) == index_version(meta):
                    raise
                if attempt == OPEN_ATTEMPTS:
                    raise SimilarityIndexError(
                        f"could not open the index at {uri}: it was replaced {OPEN_ATTEMPTS} times while it was "
                        f"being opened (last: {type(err).__name__}: {err}); try again") from None
                meta = now

    @classmethod
    def _open(cls, uri: str, meta: dict, storage_options: Optional[dict]) -> "SimilarityIndex":
        """Open the version of the index that `meta` (its index.json) describes."""
        import faiss

        layout = index_layout(meta)
        fs, root = filesystem(uri, dict(storage_options or {}))
        remote = "file" not in protocols(fs)
        # Consumers open, they do not copy: a local or shared folder is mapped in place; from object storage the
        # re-ranking rows (most of the folder) are read by range into a per-node cache, the rest copied once.
        ranged = ranged_files(layout) if remote else frozenset()
        folder = local_folder(uri, meta, storage_options, skip=ranged)
        for name, expected in meta["files"].items():
            if name in ranged:
                size = fs.size(posixpath.join(root, name))
            else:
                path = os.path.join(folder, name)
                size = os.path.getsize(path) if os.path.exists(path) else None
            if size != expected:
                raise SimilarityIndexError(f"{uri}/{name} has {size} bytes, {META_FILE} says {expected}")
        # Inverted lists are mapped as on-disk lists; a flat index's codes through the mapped-file reader.
        if meta["kind"] == "ivf":
            index = read_faiss_index(os.path.join(folder, layout["index"]), bool(layout.get("lists")))
        else:
            index = faiss.read_index(os.path.join(folder, layout["index"]), faiss.IO_FLAG_MMAP_IFC)
        ids = pa.ipc.open_file(pa.memory_map(os.path.join(folder, layout["ids"]))).read_all()
        refine = None
        if layout["refine"]:
            decoder = read_coder(os.path.join(folder, layout["refine"]["coder"]))
            codes = open_refine_rows(folder, layout["refine"], decoder.sa_code_size(), len(ids),
                                     remote=(fs, root) if remote else None)
            refine = (Refiner(decoder), codes)
        lookup = open_id_lookup(os.path.join(folder, layout["hash"]), len(ids)) if layout.get("hash") else None
        return cls(index, ids, meta, refine, lookup)


def ranged_files(layout: dict) -> frozenset:
    """The files of a layout that a node reads by range from object storage instead of copying them: the
    re-ranking segments (4 KiB a vector, most of the folder; a query reads 4*k rows of them)."""
    return frozenset(name for name, rows in (layout.get("refine") or {}).get("segments", []) if rows)


def rows_in(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of FAISS ids in an ascending id column (the id map's rows), -1 where absent (and for -1)."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(sorted_ids):
        return np.full(ids.shape, -1, dtype=np.int64)
    rows = np.searchsorted(sorted_ids, ids).clip(0, len(sorted_ids) - 1)
    return np.where((ids >= 0) & (sorted_ids[rows] == ids), rows, -1)


class Refiner:
    """The re-ranking coder (refine.faiss, or refine.coder: coders.py): a vector's offset from the mean,
    optionally projected onto the top principal directions of the offsets (a `dims`-row LinearTransform), stored
    as float16, 8-bit numbers, or a transform code. A query is scored against a code as
    q.mean + (P q).decode(code): the projection P has orthonormal rows."""

    def __init__(self, coder):
        import faiss

        self.coder = coder
        self.row_bytes = coder.sa_code_size()
        if isinstance(coder, TransformCoder):  # no FAISS quantizer: the coder decodes its own tiers
            self.mean, self.proj, self.sq, self.fp16 = coder.mean, coder.rotation, None, False
            self.dims = coder.rotation.shape[0]
            return
        chain = coder.chain
        self.mean = faiss.vector_to_array(faiss.downcast_VectorTransform(chain.at(0)).mean).astype(np.float32)
        self.proj = None
        if chain.size() > 1:
            lt = faiss.downcast_VectorTransform(chain.at(1))
            self.proj = faiss.vector_to_array(lt.A).reshape(lt.d_out, lt.d_in).astype(np.float32)
        self.sq = faiss.downcast_index(coder.index)
        self.fp16 = isinstance(self.sq, faiss.IndexScalarQuantizer) and self.sq.sq.qtype == faiss.ScalarQuantizer.QT_fp16
        self.dims = self.sq.d  # the code's own (projected) dimensions

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (uint8 rows) -> the offsets they store, in the code's own (projected) dimensions."""
        codes = np.ascontiguousarray(codes)
        if self.fp16:
            return codes.view(np.float16).astype(np.float32).reshape(len(codes), -1)
        if self.sq is None:
            return self.coder.decode_rotated(codes)
        return self.sq.sa_decode(codes)

    def queries(self, q: np.ndarray) -> np.ndarray:
        """Queries in the code's dimensions."""
        return q if self.proj is None else q @ self.proj.T

    def vectors(self, codes: np.ndarray) -> np.ndarray:
        """Full-dimension vectors from codes (the projection's component only, plus the mean)."""
        offsets = self.decode(codes)
        return (offsets if self.proj is None else offsets @ self.proj) + self.mean

    def describe(self) -> str:
        """What the codes are, for the factory string: FP16, or PCA512,FP16, or PCA1024,SQ8."""
        import faiss

        if self.sq is None:
            return self.coder.describe()
        if self.fp16:
            code = "FP16"
        elif isinstance(self.sq, faiss.IndexPQ):
            code = f"PQ{self.sq.pq.M}"
        else:
            code = {faiss.ScalarQuantizer.QT_8bit: "SQ8", faiss.ScalarQuantizer.QT_6bit: "SQ6",
                    faiss.ScalarQuantizer.QT_4bit: "SQ4"}.get(self.sq.sq.qtype, "SQ")
        return code if self.proj is None else f"PCA{self.dims},{code}"


def decode_offsets(codes: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Full-dimension vectors from full-dimension float16 re-ranking codes (offsets from the mean, as bytes)."""
    return codes.view(np.float16).astype(np.float32) + mean


def refined_search(base, refiner: "Refiner", codes: np.ndarray, rows_of, q: np.ndarray, k: int, k_factor: int,
                   block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Search `base` for k_factor*k candidates, then re-score them with their re-ranking codes (codes[row] of
    the candidates' id-map rows, decoded by `refiner`) and keep the k best: (scores, ids), best first."""
    _, cand = base.search(q, k * k_factor)
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    for s in range(0, len(q), block):
        c, qb = cand[s:s + block], q[s:s + block]
        rows = rows_of(c)
        valid = rows >= 0
        offsets = refiner.decode(codes[np.where(valid, rows, 0).ravel()])
        qp = refiner.queries(qb)
        sc = np.matmul(offsets.reshape(*c.shape, -1), qp[:, :, None])[..., 0] + (qb @ refiner.mean)[:, None]
        sc[~valid] = -np.inf
        top = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        scores[s:s + block, :top.shape[1]] = np.take_along_axis(sc, top, axis=1)
        ids[s:s + block, :top.shape[1]] = np.where(np.take_along_axis(valid, top, axis=1),
                                                   np.take_along_axis(c, top, axis=1), -1)
    return scores, ids


def refine_mean(decoder) -> np.ndarray:
    """The mean the re-ranking offsets are taken from (the coder's centering transform)."""
    return Refiner(decoder).mean


def index_version(meta: dict) -> tuple:
    """What tells two published versions of an index folder apart: the build and the generation."""
    return meta.get("build_id"), meta.get("generation", 0)


def read_meta(uri: str, storage_options: Optional[dict] = None) -> dict:
    """index.json of an index folder, without loading the index."""
    fs, root = filesystem(uri, dict(storage_options or {}))
    try:
        with fs.open(posixpath.join(root, META_FILE), "rb") as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise SimilarityIndexError(f"no index at {uri} ({META_FILE} missing; "
                                   "build one with `resnet-batch index`)") from None
    if meta.get("format") not in INDEX_FORMATS:
        raise SimilarityIndexError(f"the index at {uri} is in an older format; rebuild it with `resnet-batch index`")
    return meta


def local_folder(uri: str, meta: dict, storage_options: Optional[dict] = None, skip: frozenset = frozenset()) -> str:
    """A local folder holding the index's data files: the folder itself when local, else a node-local copy of
    them but those in `skip` (read by range instead).

    The copy is keyed by URI and build id, made once per node under a file lock (the actors of one node wait for
    the first), each file downloaded to a temp name and renamed, so a copy is never seen half-written. Files of
    a generation never change, so an update downloads only its own; generations older than the one before are
    removed from the cache, as from the folder.
    """
    fs, root = filesystem(uri, dict(storage_options or {}))
    if "file" in protocols(fs):
        return root
    key = hashlib.sha256(f"{uri}\0{meta['build_id']}".encode()).hexdigest()[:24]
    folder = cache_dir() / "indexes" / key
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, size in meta["files"].items():
            if name in skip:
                continue
            dest = folder / name
            if dest.exists() and dest.stat().st_size == size:
                continue
            dest.parent.mkdir(exist_ok=True)
            tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
            fs.get_file(posixpath.join(root, name), str(tmp))
            os.replace(tmp, dest)
        _drop_old_generations(folder, meta)
        (folder / "source.json").write_text(json.dumps({"uri": uri, "build_id": meta["build_id"],
                                                        "generation": meta.get("generation", 0)}))
    return str(folder)


def _drop_old_generations(folder: Path, meta: dict) -> None:
    """Cached generation folders that neither this generation nor the one before uses (their readers are gone)."""
    import shutil

    keep = {name.split("/")[0] for name in [*meta["files"], *meta.get("previous_files", [])]}
    for sub in folder.iterdir():
        if sub.name in keep:
            continue
        if generation_of(sub.name) is not None:
            shutil.rmtree(sub, ignore_errors=True)
        elif sub.name in DATA_FILES or sub.name.split(".ranges")[0] in DATA_FILES:  # a file or its range cache
            if sub.name.split(".ranges")[0] not in keep:
                sub.unlink(missing_ok=True)
