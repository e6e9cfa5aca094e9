"""index module: a FAISS cosine index over the embeddings, chosen by size, saved with its id map and provenance."""
from __future__ import annotations

import json
import math
import posixpath
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.provenance import ProvenanceMismatch, differences
from resnet_batch.schema import EMBEDDING_DIM, PROVENANCE_KEY, STATUS_OK, embeddings_to_numpy, read_provenance
from resnet_batch.storage import display_path, filesystem, protocols, put_bytes

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"  # written last: an index folder without it is incomplete
FLAT_MAX = 50_000  # up to this many vectors the index is exact (flat); above, approximate
IVFPQ_MIN = 1_000  # fewer vectors cannot train an IVF-PQ index
REFINE_MAX = 4_000_000  # IVF-PQ up to this many vectors keeps 8-bit vectors to re-rank (about 9 GB there)
K_FACTOR = 8  # re-ranked shortlist: k_factor x k PQ candidates
KINDS = ("auto", "flat", "ivfpq", "hnsw")
IDS_SCHEMA = pa.schema([pa.field("image_id", pa.string(), nullable=False), pa.field("path", pa.string()),
                        pa.field("label", pa.string()), pa.field("prob", pa.float32())])
_READ_COLUMNS = ["image_id", "path", "topk_labels", "topk_probs", "embedding", "status"]


from resnet_batch.errors import SimilarityIndexError  # noqa: E402 (re-exported)


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index to build for a count of vectors, and how to search it."""

    kind: str  # flat | ivfpq | hnsw
    factory: str  # faiss.index_factory string
    train_size: int  # vectors sampled for training (0: no training)
    search: str  # faiss.ParameterSpace string applied at load time ("" for flat)

    @classmethod
    def choose(cls, n: int, kind: str = "auto", dim: int = EMBEDDING_DIM, flat_max: int = FLAT_MAX) -> "IndexSpec":
        """Exact flat up to `flat_max` vectors; above it IVF-PQ (compact) unless HNSW is asked for."""
        if kind not in KINDS:
            raise SimilarityIndexError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        if kind == "auto":
            kind = "flat" if n <= max(flat_max, IVFPQ_MIN - 1) else "ivfpq"
        if kind == "flat":
            return cls("flat", "Flat", 0, "")
        if kind == "hnsw":
            m = 32 if n <= 1_000_000 else 48
            return cls("hnsw", f"HNSW{m},Flat", 0, "efSearch=128")
        # IVF-PQ: ~2*sqrt(n) lists (power of two), 1/16 of them probed; 16-d sub-vectors coded in 8 bits (fewer
        # below 10k vectors, where 256 centroids per sub-space cannot be trained). Up to REFINE_MAX vectors the
        # PQ shortlist (k_factor_rf x k) is re-ranked with 8-bit scalar-quantised vectors (2 KiB each).
        if n < IVFPQ_MIN:
            raise SimilarityIndexError(f"an IVF-PQ index needs at least {IVFPQ_MIN} vectors to train, got {n}; "
                                       "use --kind flat")
        nlist = int(min(65536, max(16, 2 ** round(math.log2(2 * math.sqrt(n))))))
        m = next(m for m in (128, 64, 32, 16, 8, 4, 2, 1) if dim % m == 0)
        nbits = int(min(8, max(4, math.floor(math.log2(n / 39)))))
        train = min(n, max(40 * nlist, 10_000), 500_000)
        refine = n <= REFINE_MAX
        factory = f"IVF{nlist},PQ{m}x{nbits}" + (",Refine(SQ8)" if refine else "")
        search = f"nprobe={max(1, nlist // 16)}" + (f",k_factor_rf={K_FACTOR}" if refine else "")
        return cls("ivfpq", factory, train, search)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a copy, float32); all-zero rows stay zero."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def new_faiss_index(spec: IndexSpec, train: Optional[np.ndarray], dim: int = EMBEDDING_DIM, seed: int = 0):
    """An empty, trained FAISS inner-product index for `spec` (train: normalised vectors, or None)."""
    import faiss

    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    if spec.kind == "ivfpq":
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.do_polysemous_training = False  # polysemous codes are not used in search; training them is slow
        ivf.cp.seed = seed
        ivf.pq.cp.seed = seed
    if not index.is_trained:
        if train is None or len(train) == 0:
            raise SimilarityIndexError(f"{spec.factory} needs training vectors")
        index.train(np.ascontiguousarray(train, dtype=np.float32))
    if spec.search:
        faiss.ParameterSpace().set_index_parameters(index, spec.search)
    return index


# -- embeddings on storage ---------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One Parquet file of embeddings and how many of its rows are usable (status 'ok')."""

    uri: str  # as displayed: a local path or protocol://...
    path: str  # filesystem path (no protocol)
    ok_rows: int


def list_parquet(uri: str, storage_options: Optional[dict] = None) -> tuple[object, list[str]]:
    """The fsspec filesystem and the Parquet parts under `uri` (an embed output folder or one .parquet file)."""
    fs, root = filesystem(uri, dict(storage_options or {}))
    if fs.isfile(root):
        return fs, [root]
    try:
        names = sorted(fs.ls(root, detail=False))
    except FileNotFoundError:
        raise SimilarityIndexError(f"embeddings not found: {uri}") from None
    files = [p for p in names if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))]
    parts = [p for p in files if posixpath.basename(p).startswith("part-")]
    if not (parts or files):
        raise SimilarityIndexError(f"no Parquet files under {uri}")
    return fs, parts or files


def scan_embeddings(uris: Sequence[str], storage_options: Optional[dict] = None) -> tuple[list[tuple], dict]:
    """[(fs, Part)] for every part under `uris` and their common provenance; mixed provenance is refused."""
    found, provenance, first = [], None, None
    for uri in uris:
        fs, paths = list_parquet(uri, storage_options)
        for path in paths:
            shown = display_path(protocols(fs)[0], path)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                prov = read_provenance(pf.schema_arrow)
                if prov is None:
                    raise SimilarityIndexError(f"{shown} has no {PROVENANCE_KEY.decode()} metadata: "
                                               "cannot tell which model made these embeddings")
                if "embedding" not in pf.schema_arrow.names:
                    raise SimilarityIndexError(f"{shown} has no embedding column")
                status = pf.read(columns=["status"]).column("status")
            if provenance is None:
                provenance, first = prov, shown
            elif diffs := differences(provenance, prov):
                raise ProvenanceMismatch(f"refusing to mix embeddings with different provenance: {shown} differs "
                                         f"from {first}: " + "; ".join(diffs))
            ok = int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0)
            found.append((fs, Part(shown, path, ok)))
    if not found:
        raise SimilarityIndexError("no embeddings given")
    return found, provenance


def read_ok_rows(fs, path: str, columns: Sequence[str] = _READ_COLUMNS) -> pa.Table:
    """The rows of one Parquet part with status 'ok' (those with an embedding)."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=list(dict.fromkeys([*columns, "status"])))
    return table.filter(pc.equal(table.column("status"), STATUS_OK))


def id_rows(table: pa.Table) -> pa.Table:
    """The id-map rows (image_id, path, top-1 label and probability) of embedding rows."""
    return pa.table({
        "image_id": table.column("image_id"),
        "path": table.column("path"),
        "label": pc.list_element(table.column("topk_labels"), 0),
        "prob": pc.list_element(table.column("topk_probs"), 0),
    }, schema=IDS_SCHEMA)


# -- the index -----------------------------------------------------------------------------------


class SimilarityIndex:
    """A FAISS index over L2-normalised embeddings (inner product = cosine) plus its id map and metadata."""

    def __init__(self, index, ids: pa.Table, meta: dict):
        if index.ntotal != len(ids):
            raise SimilarityIndexError(f"index holds {index.ntotal} vectors but the id map {len(ids)} rows")
        self.index, self.ids, self.meta = index, ids, meta
        self._image_ids = np.array(ids.column("image_id").to_pylist() + [None], dtype=object)  # [-1] -> None
        self._positions: Optional[dict] = None
        self._direct_map = False

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def provenance(self) -> dict:
        return self.meta["provenance"]

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each (n, k): cosine similarity, best first; position -1 where fewer than k exist."""
        q = normalize(np.atleast_2d(vectors))
        if q.shape[1] != self.index.d:
            raise SimilarityIndexError(f"query vectors have {q.shape[1]} dimensions, the index {self.index.d}")
        return self.index.search(q, int(k))

    def image_ids(self, positions: np.ndarray) -> np.ndarray:
        """image_id for each position (None for -1)."""
        return self._image_ids[np.asarray(positions)]

    def position(self, image_id: str) -> int:
        if self._positions is None:
            self._positions = {v: i for i, v in enumerate(self._image_ids[:-1])}
        try:
            return self._positions[image_id]
        except KeyError:
            raise KeyError(f"image_id {image_id!r} is not in the index") from None

    def vector(self, image_id: str) -> np.ndarray:
        """The indexed (normalised) vector of an image; a quantised index gives its approximation."""
        import faiss

        if self.meta["kind"] == "ivfpq" and not isinstance(self.index, faiss.IndexRefine) and not self._direct_map:
            faiss.extract_index_ivf(self.index).make_direct_map()  # position -> list entry, built once
            self._direct_map = True
        return self.index.reconstruct(self.position(image_id))

    def row(self, position: int) -> dict:
        return {c: self.ids.column(c)[position].as_py() for c in self.ids.column_names}

    # -- storage ---------------------------------------------------------------------------------
    def save(self, uri: str, storage_options: Optional[dict] = None) -> None:
        """Write index.faiss, ids.parquet, then index.json (last) under `uri`."""
        import faiss

        fs, root = filesystem(uri, dict(storage_options or {}))
        data = faiss.serialize_index(self.index).tobytes()
        sink = pa.BufferOutputStream()
        pq.write_table(self.ids, sink, compression="zstd")
        if fs.exists(posixpath.join(root, META_FILE)):
            fs.rm(posixpath.join(root, META_FILE))
        put_bytes(fs, posixpath.join(root, INDEX_FILE), data)
        put_bytes(fs, posixpath.join(root, IDS_FILE), sink.getvalue().to_pybytes())
        meta = {**self.meta, "index_bytes": len(data)}
        put_bytes(fs, posixpath.join(root, META_FILE), json.dumps(meta, indent=2, sort_keys=True).encode())
        self.meta = meta

    @classmethod
    def load(cls, uri: str, storage_options: Optional[dict] = None) -> "SimilarityIndex":
        """Read an index folder written by `save`."""
        import faiss

        meta = read_meta(uri, storage_options)
        fs, root = filesystem(uri, dict(storage_options or {}))
        with fs.open(posixpath.join(root, INDEX_FILE), "rb") as f:
            data = f.read()
        if len(data) != meta["index_bytes"]:
            raise SimilarityIndexError(f"{uri}/{INDEX_FILE} has {len(data)} bytes, "
                                       f"{META_FILE} says {meta['index_bytes']}")
        with fs.open(posixpath.join(root, IDS_FILE), "rb") as f:
            ids = pq.read_table(f)
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if meta.get("search"):
            faiss.ParameterSpace().set_index_parameters(index, meta["search"])
        return cls(index, ids, meta)


def read_meta(uri: str, storage_options: Optional[dict] = None) -> dict:
    """index.json of an index folder, without loading the index."""
    fs, root = filesystem(uri, dict(storage_options or {}))
    try:
        with fs.open(posixpath.join(root, META_FILE), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise SimilarityIndexError(f"no index at {uri} ({META_FILE} missing; "
                                   "build one with `resnet-batch index`)") from None


def _sample_rows(counts: list[int], size: int, seed: int) -> list[np.ndarray]:
    """Per part, the sorted row numbers (among its ok rows) of a uniform sample of `size` rows overall."""
    total = sum(counts)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    bounds = np.cumsum([0, *counts])
    return [picked[(picked >= lo) & (picked < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def build_index(uris: Sequence[str], *, kind: str = "auto", flat_max: int = FLAT_MAX,
                storage_options: Optional[dict] = None, seed: int = 0,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> SimilarityIndex:
    """Index every 'ok' embedding under `uris` (all with one provenance): train on a sample, then add part by part."""
    t0 = time.perf_counter()
    parts, provenance = scan_embeddings(uris, storage_options)
    n = sum(p.ok_rows for _, p in parts)
    if n == 0:
        raise SimilarityIndexError(f"no embeddings with status 'ok' under {', '.join(uris)}")
    spec = IndexSpec.choose(n, kind, flat_max=flat_max)
    log(f"indexing {n} embeddings from {len(parts)} parts: {spec.kind} ({spec.factory}"
        f"{', ' + spec.search if spec.search else ''})")
    train = None
    t_train = time.perf_counter()
    if spec.train_size:
        chunks = []
        for (fs, part), rows in zip(parts, _sample_rows([p.ok_rows for _, p in parts], spec.train_size, seed)):
            if len(rows):
                emb = read_ok_rows(fs, part.path, ["embedding"]).column("embedding").take(pa.array(rows))
                chunks.append(normalize(embeddings_to_numpy(emb)))
        train = np.concatenate(chunks)
    index = new_faiss_index(spec, train, seed=seed)
    train_s = time.perf_counter() - t_train
    tables, seen = [], set()
    for fs, part in parts:
        table = read_ok_rows(fs, part.path)
        for image_id in table.column("image_id").to_pylist():
            if image_id in seen:
                raise SimilarityIndexError(f"image_id {image_id!r} appears more than once (again in {part.uri}); "
                                           "index one embed output per input root")
            seen.add(image_id)
        index.add(normalize(embeddings_to_numpy(table.column("embedding"))))
        tables.append(id_rows(table))
    meta = {"kind": spec.kind, "factory": spec.factory, "search": spec.search, "metric": "cosine",
            "train_size": 0 if train is None else len(train), "count": int(index.ntotal), "dim": int(index.d),
            "provenance": provenance, "sources": list(uris), "parts": len(parts), "seed": seed,
            "train_s": round(train_s, 3), "build_s": round(time.perf_counter() - t0, 3), "faiss": _faiss_version()}
    return SimilarityIndex(index, pa.concat_tables(tables), meta)


def _faiss_version() -> str:
    import faiss

    return faiss.__version__
