"""neighbors module: a Ray job writing every image's top-k neighbours (itself excluded) and near-duplicate groups.

Each actor opens the index memory-mapped (one copy per node in the page cache) with the tuned nprobe, turns
embeddings parts into neighbours parts and writes them itself; the driver gets back per-part counts and the
links at or above the threshold, from which it builds the near-duplicate groups: it never re-lists the output.
"""
from __future__ import annotations

import base64
import json
import os
import posixpath
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.config import redact_options
from resnet_batch.search.embeddings import list_parts, read_ok_rows, scan_embeddings
from resnet_batch.errors import ConfigError, OutputError, ProvenanceMismatch, RunFailed
from resnet_batch.search.index import SimilarityIndex, read_meta
from resnet_batch.provenance import differences
from resnet_batch.schema import embeddings_to_numpy, with_provenance
from resnet_batch.storage import filesystem, list_folder, protocols, put_bytes
from resnet_batch.output.store import part_name

NEIGHBORS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("neighbor_ids", pa.list_(pa.string())),  # best first, the image itself excluded
    pa.field("scores", pa.list_(pa.float32())),  # cosine similarity, same order
])
GROUPS_SCHEMA = pa.schema([
    pa.field("group_id", pa.int32(), nullable=False),
    pa.field("size", pa.int32(), nullable=False),
    pa.field("image_ids", pa.list_(pa.string())),  # sorted
    pa.field("min_score", pa.float32()),  # the weakest neighbour link that joined the group
])
GROUPS_FILE = "near_duplicates.parquet"
REPORT_FILE = "_neighbors.json"
MARKER_FILE = "_NEIGHBORS"  # written before any part: this folder is a neighbours output (safe to clear)
NEIGHBORS_KEY = b"resnet_batch.neighbors"  # Parquet metadata: k and the index the table was searched in


@dataclass(frozen=True)
class NeighborsConfig:
    """One neighbours run: which index, which embeddings to query with (default: the index's), where to write."""

    index: str
    out: str
    k: int = 10
    threshold: float = 0.95
    embeddings: tuple[str, ...] = ()
    storage_options: dict = field(default_factory=dict)
    actors: int = 1
    cpus_per_actor: float = 1.0
    query_batch: int = 1024
    nprobe: Optional[int] = None  # default: the tuned value index.json records
    ray_address: Optional[str] = None

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.actors < 1:
            raise ConfigError(f"actors must be >= 1, got {self.actors}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"nprobe must be >= 1, got {self.nprobe}")


def exclude_self(query_ids: np.ndarray, found: np.ndarray, scores: np.ndarray, k: int) -> tuple[list, list]:
    """Per query, the first k found ids that are not the query itself (nor empty slots), with their scores."""
    keep = (found != np.asarray(query_ids, dtype=object)[:, None]) & (found != None)  # noqa: E711 (elementwise)
    ids_out, scores_out = [], []
    for row_ids, row_scores, row_keep in zip(found, scores, keep):
        ids_out.append(list(row_ids[row_keep][:k]))
        scores_out.append([float(s) for s in row_scores[row_keep][:k]])
    return ids_out, scores_out


def neighbors_rows(index: SimilarityIndex, image_ids: list, vectors: np.ndarray, k: int, batch: int) -> pa.Table:
    """The neighbours table for these query images (searched k+1 deep so that dropping the image itself leaves k)."""
    all_ids, all_scores = [], []
    for start in range(0, len(image_ids), batch):
        scores, found = index.search(vectors[start:start + batch], k + 1)
        ids, sc = exclude_self(np.array(image_ids[start:start + batch], dtype=object),
                               index.image_ids(found), scores, k)
        all_ids += ids
        all_scores += sc
    return pa.table({"image_id": pa.array(image_ids, pa.string()), "neighbor_ids": all_ids,
                     "scores": all_scores}, schema=NEIGHBORS_SCHEMA)


def near_duplicate_groups(neighbors: pa.Table, threshold: float) -> pa.Table:
    """Connected components of the links with score >= threshold (groups of two or more), largest first."""
    scores = neighbors.column("scores").combine_chunks()
    parent_rows = pc.list_parent_indices(scores)
    flat_scores = pc.list_flatten(scores)
    strong = pc.greater_equal(flat_scores, pa.scalar(threshold, pa.float32()))
    src = pc.take(neighbors.column("image_id"), pc.filter(parent_rows, strong)).to_pylist()
    dst = pc.filter(pc.list_flatten(neighbors.column("neighbor_ids").combine_chunks()), strong).to_pylist()
    edge_scores = pc.filter(flat_scores, strong).to_numpy(zero_copy_only=False)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(src, dst):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list] = {}
    for x in parent:
        members.setdefault(find(x), []).append(x)
    weakest: dict[str, float] = {}
    for a, s in zip(src, edge_scores):
        r = find(a)
        weakest[r] = min(weakest.get(r, float("inf")), float(s))
    groups = sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))
    return pa.table({"group_id": pa.array(range(len(groups)), pa.int32()),
                     "size": pa.array([len(g) for g in groups], pa.int32()),
                     "image_ids": groups,
                     "min_score": pa.array([weakest[find(g[0])] for g in groups], pa.float32())},
                    schema=GROUPS_SCHEMA)


def strong_links(table: pa.Table, threshold: float) -> pa.Table:
    """The rows of a neighbours table whose best score reaches `threshold` (what the groups are built from)."""
    table = table.filter(pc.greater(pc.list_value_length(table.column("scores")), 0))
    return table.filter(pc.greater_equal(pc.list_element(table.column("scores"), 0), threshold))


def to_text(table: pa.Table) -> str:
    """A small table as base64 Arrow IPC: it travels in a Ray Data batch (numpy would strip bytes' NULs)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def from_text(text: str) -> pa.Table:
    return pa.ipc.open_stream(base64.b64decode(text)).read_all()


@dataclass(frozen=True)
class ActorSettings:
    """What every neighbours actor needs, by keyword."""

    index_uri: str
    out_uri: str
    storage_options: dict
    k: int
    threshold: float
    query_batch: int
    nprobe: Optional[int]
    schema: pa.Schema
    threads: int


class NeighborsActor:
    """Ray Data actor: opens the index once (memory-mapped), then turns each embeddings part into a neighbours part."""

    def __init__(self, settings: ActorSettings):
        import faiss

        faiss.omp_set_num_threads(settings.threads)
        t0 = time.perf_counter()
        self.index = SimilarityIndex.open(settings.index_uri, settings.storage_options)
        if settings.nprobe:
            self.index.set_nprobe(settings.nprobe)
        self.load_s = time.perf_counter() - t0
        self.actor_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.fs, self.root = filesystem(settings.out_uri, dict(settings.storage_options))
        self.s = settings

    def __call__(self, batch: dict) -> dict:
        keys = ("out", "source", "rows", "failed", "work_s", "search_s", "cpu_s", "actor", "load_s", "strong")
        out = {key: [] for key in keys}
        for source, name in zip(batch["source"], batch["out"]):
            t0, cpu0 = time.perf_counter(), time.process_time()
            fs, path = filesystem(str(source), self.s.storage_options)
            with fs.open(path, "rb") as f:
                total = pq.ParquetFile(f).metadata.num_rows
            rows = read_ok_rows(fs, path, ["image_id", "embedding"])
            t_search = time.perf_counter()
            table = neighbors_rows(self.index, rows.column("image_id").to_pylist(),
                                   embeddings_to_numpy(rows.column("embedding")), self.s.k, self.s.query_batch)
            search_s = time.perf_counter() - t_search
            sink = pa.BufferOutputStream()
            pq.write_table(table.replace_schema_metadata(self.s.schema.metadata), sink, compression="zstd")
            put_bytes(self.fs, posixpath.join(self.root, str(name)), sink.getvalue().to_pybytes())
            for key, value in zip(keys, (str(name), str(source), len(table), total - len(rows),
                                         time.perf_counter() - t0, search_s, time.process_time() - cpu0,
                                         self.actor_id, self.load_s,
                                         to_text(strong_links(table, self.s.threshold)))):
                out[key].append(value)
        return out


def plan_parts(cfg: NeighborsConfig, meta: dict) -> tuple[list[dict], dict, list[str]]:
    """One work item per embeddings part (output part-NNNNNN.parquet), after checking it matches the index."""
    sources = list(cfg.embeddings) or list(meta["sources"])
    parts, provenance = scan_embeddings(sources, cfg.storage_options)
    if diffs := differences(meta["provenance"], provenance):
        raise ProvenanceMismatch(f"embeddings {', '.join(sources)} were made with a different setup than the "
                                 f"index {cfg.index}: " + "; ".join(diffs))
    items = [{"source": p.uri, "out": part_name(i)} for i, (_, p) in enumerate(parts)]
    return items, provenance, sources


def _location(uri: str, storage_options: dict) -> tuple[str, str]:
    """(protocol family, normalised path) for comparing locations: local paths resolved, symlinks followed."""
    fs, root = filesystem(uri, dict(storage_options))
    if "file" in protocols(fs):
        return "file", os.path.realpath(root)
    return protocols(fs)[0].replace("s3a", "s3"), root.rstrip("/")


def check_out(out: str, inputs: list[tuple[str, str]], storage_options: dict) -> None:
    """Refuse an --out that equals, contains or lies inside an input (the embeddings, the index)."""
    o_proto, o_path = _location(out, storage_options)
    for what, uri in inputs:
        proto, path = _location(uri, storage_options)
        if proto != o_proto:
            continue
        if o_path == path:
            how = "is"
        elif path.startswith(o_path.rstrip("/") + "/"):
            how = "contains"
        elif o_path.startswith(path.rstrip("/") + "/"):
            how = "lies inside"
        else:
            continue
        raise OutputError(f"--out {out} {how} the {what} {uri}; write the neighbours to a folder of their own")


def prepare_output(uri: str, storage_options: dict, about: dict) -> None:
    """Make `uri` a neighbours output: a new or empty folder, or an earlier neighbours run's (whose files
    are removed); a folder holding anything else is refused. The marker is written before any part."""
    fs, root = filesystem(uri, dict(storage_options))
    fs.invalidate_cache(root)
    if fs.isfile(root):
        raise OutputError(f"--out {uri} is a file, not a folder")
    names = {posixpath.basename(p): p for p in list_folder(fs, root)}
    if names and MARKER_FILE not in names and REPORT_FILE not in names:
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise OutputError(f"--out {uri} is not empty ({shown}) and is not a neighbours output; "
                          "choose a new or empty folder")
    for name, path in names.items():
        if (name.startswith("part-") and name.endswith(".parquet")) or name in (GROUPS_FILE, REPORT_FILE):
            fs.rm(path)
    put_bytes(fs, posixpath.join(root, MARKER_FILE), json.dumps(about, sort_keys=True).encode())


def read_neighbors(uri: str, storage_options: Optional[dict] = None, min_score: Optional[float] = None) -> pa.Table:
    """All parts of a neighbours table; with `min_score`, only rows whose best neighbour scores at least that."""
    fs, paths = list_parts(uri, storage_options)
    tables = []
    for p in paths:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f).cast(NEIGHBORS_SCHEMA)
        tables.append(table if min_score is None else strong_links(table, min_score))
    return pa.concat_tables(tables) if tables else NEIGHBORS_SCHEMA.empty_table()


def run_neighbors(cfg: NeighborsConfig, progress: bool = True) -> dict:
    """Run the job: neighbours parts through a Ray actor pool, then the near-duplicate groups; returns the report."""
    import ray

    from resnet_batch.embed.runner import init_ray

    t0 = time.perf_counter()
    meta = read_meta(cfg.index, cfg.storage_options)
    items, provenance, sources = plan_parts(cfg, meta)
    check_out(cfg.out, [("embeddings", s) for s in sources] + [("index", cfg.index)], cfg.storage_options)
    nprobe = cfg.nprobe or meta.get("nprobe")
    _log(f"neighbours: {len(items)} parts against {meta['factory']} index {cfg.index} ({meta['count']} images"
         f"{f', nprobe={nprobe}' if nprobe else ''}), k={cfg.k}", progress)
    about = {"k": cfg.k, "index": cfg.index, "index_kind": meta["kind"], "index_count": meta["count"],
             "nprobe": nprobe}
    prepare_output(cfg.out, cfg.storage_options, about)
    schema = with_provenance(NEIGHBORS_SCHEMA, provenance)
    schema = schema.with_metadata({**schema.metadata, NEIGHBORS_KEY: json.dumps(about).encode()})
    init_ray(cfg.ray_address)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = progress
    settings = ActorSettings(index_uri=cfg.index, out_uri=cfg.out, storage_options=dict(cfg.storage_options),
                             k=cfg.k, threshold=cfg.threshold, query_batch=cfg.query_batch, nprobe=cfg.nprobe,
                             schema=schema, threads=max(1, int(cfg.cpus_per_actor)))
    ds = ray.data.from_items(items).map_batches(
        NeighborsActor, batch_size=1, batch_format="numpy", fn_constructor_kwargs={"settings": settings},
        compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.cpus_per_actor)
    stats = ds.take_all()
    if sorted(str(s["out"]) for s in stats) != [i["out"] for i in items]:
        raise RunFailed(f"neighbours job finished {len(stats)} of {len(items)} parts")
    t_groups = time.perf_counter()
    strong = pa.concat_tables([from_text(str(s["strong"])) for s in stats]) if stats \
        else NEIGHBORS_SCHEMA.empty_table()
    groups = near_duplicate_groups(strong, cfg.threshold)
    fs, root = filesystem(cfg.out, dict(cfg.storage_options))
    sink = pa.BufferOutputStream()
    pq.write_table(groups.replace_schema_metadata(with_provenance(GROUPS_SCHEMA, provenance).metadata), sink)
    put_bytes(fs, posixpath.join(root, GROUPS_FILE), sink.getvalue().to_pybytes())
    images = sum(int(s["rows"]) for s in stats)
    search_s = sum(float(s["search_s"]) for s in stats)
    report = {
        "config": {**asdict(cfg), "storage_options": redact_options(cfg.storage_options)},
        "index_kind": meta["kind"], "index_factory": meta["factory"], "index_count": meta["count"],
        "nprobe": nprobe, "parts": len(stats), "images": images,
        "failed_rows_skipped": sum(int(s["failed"]) for s in stats),
        "near_duplicate_groups": len(groups), "images_in_groups": int(pc.sum(groups.column("size")).as_py() or 0),
        "actors": sorted({str(s["actor"]) for s in stats}),
        "index_load_s": max((float(s["load_s"]) for s in stats), default=0.0),
        "parts_s": round(sum(float(s["work_s"]) for s in stats), 3),  # read + search + write, all actors
        "search_s": round(search_s, 3),  # the searches alone, all actors
        "search_ms_per_query": round(1000 * search_s / max(images, 1), 4),
        "cpu_s": round(sum(float(s["cpu_s"]) for s in stats), 3),  # CPU time of the actors' part work, all threads
        "cpu_ms_per_query": round(1000 * sum(float(s["cpu_s"]) for s in stats) / max(images, 1), 4),
        "groups_s": round(time.perf_counter() - t_groups, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "outputs": {str(s["out"]): str(s["source"]) for s in sorted(stats, key=lambda s: str(s["out"]))},
    }
    put_bytes(fs, posixpath.join(root, REPORT_FILE), json.dumps(report, indent=2, sort_keys=True).encode())
    return report


def _log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
