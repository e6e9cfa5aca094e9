"""neighbors module: a Ray job writing every image's top-k neighbours (itself excluded) and near-duplicate groups."""
from __future__ import annotations

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
from resnet_batch.index import SimilarityIndex, read_meta, read_ok_rows, scan_embeddings
from resnet_batch.provenance import ProvenanceMismatch, differences
from resnet_batch.schema import embeddings_to_numpy, with_provenance
from resnet_batch.storage import filesystem, list_folder, put_bytes
from resnet_batch.writer import OutputStore

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
    ray_address: Optional[str] = None

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")


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
        scores, positions = index.search(vectors[start:start + batch], k + 1)
        ids, sc = exclude_self(np.array(image_ids[start:start + batch], dtype=object),
                               index.image_ids(positions), scores, k)
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


class NeighborsActor:
    """Ray Data actor: loads the index once, then turns each embeddings part into a neighbours part."""

    def __init__(self, index_uri: str, storage_options: dict, out_uri: str, k: int, query_batch: int,
                 schema: pa.Schema, threads: int):
        import faiss

        faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        self.index = SimilarityIndex.load(index_uri, storage_options)
        self.load_s = time.perf_counter() - t0
        self.actor_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.fs, self.root = filesystem(out_uri, dict(storage_options))
        self.storage_options = storage_options
        self.k, self.query_batch, self.schema = k, query_batch, schema

    def __call__(self, batch: dict) -> dict:
        out = {"out": [], "source": [], "rows": [], "failed": [], "work_s": [], "actor": [], "load_s": []}
        for source, name in zip(batch["source"], batch["out"]):
            t0 = time.perf_counter()
            fs, path = filesystem(source, self.storage_options)
            with fs.open(path, "rb") as f:
                total = pq.ParquetFile(f).metadata.num_rows
            rows = read_ok_rows(fs, path, ["image_id", "embedding"])
            table = neighbors_rows(self.index, rows.column("image_id").to_pylist(),
                                   embeddings_to_numpy(rows.column("embedding")), self.k, self.query_batch)
            sink = pa.BufferOutputStream()
            pq.write_table(table.replace_schema_metadata(self.schema.metadata), sink, compression="zstd")
            put_bytes(self.fs, posixpath.join(self.root, str(name)), sink.getvalue().to_pybytes())
            for key, value in (("out", str(name)), ("source", str(source)), ("rows", len(table)),
                               ("failed", total - len(rows)), ("work_s", time.perf_counter() - t0),
                               ("actor", self.actor_id), ("load_s", self.load_s)):
                out[key].append(value)
        return out


def plan_parts(cfg: NeighborsConfig, meta: dict) -> tuple[list[dict], dict]:
    """One work item per embeddings part (output part-NNNNNN.parquet), after checking it matches the index."""
    sources = list(cfg.embeddings) or list(meta["sources"])
    parts, provenance = scan_embeddings(sources, cfg.storage_options)
    if diffs := differences(meta["provenance"], provenance):
        raise ProvenanceMismatch(f"embeddings {', '.join(sources)} were made with a different setup than the "
                                 f"index {cfg.index}: " + "; ".join(diffs))
    return [{"source": p.uri, "out": OutputStore.part_name(i)} for i, (_, p) in enumerate(parts)], provenance


def clear_output(uri: str, storage_options: dict) -> None:
    """Remove what an earlier neighbours run wrote there (our files only)."""
    fs, root = filesystem(uri, dict(storage_options))
    for p in list_folder(fs, root):
        base = posixpath.basename(p)
        if (base.startswith("part-") and base.endswith(".parquet")) or base in (GROUPS_FILE, REPORT_FILE):
            fs.rm(p)


def read_neighbors(uri: str, storage_options: Optional[dict] = None, min_score: Optional[float] = None) -> pa.Table:
    """All parts of a neighbours table; with `min_score`, only rows whose best neighbour scores at least that."""
    fs, root = filesystem(uri, dict(storage_options or {}))
    paths = sorted(p for p in fs.ls(root, detail=False)
                   if posixpath.basename(p).startswith("part-") and p.endswith(".parquet"))
    tables = []
    for p in paths:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f).cast(NEIGHBORS_SCHEMA)
        if min_score is not None:  # scores are sorted, so the first one tells whether a row has a strong link
            table = table.filter(pc.greater(pc.list_value_length(table.column("scores")), 0))
            table = table.filter(pc.greater_equal(pc.list_element(table.column("scores"), 0), min_score))
        tables.append(table)
    return pa.concat_tables(tables) if tables else NEIGHBORS_SCHEMA.empty_table()


def run_neighbors(cfg: NeighborsConfig, progress: bool = True) -> dict:
    """Run the job: neighbours parts through a Ray actor pool, then the near-duplicate groups; returns the report."""
    import ray

    from resnet_batch.runner import init_ray

    t0 = time.perf_counter()
    meta = read_meta(cfg.index, cfg.storage_options)
    items, provenance = plan_parts(cfg, meta)
    _log(f"neighbours: {len(items)} parts against {meta['kind']} index {cfg.index} ({meta['count']} images), "
         f"k={cfg.k}", progress)
    clear_output(cfg.out, cfg.storage_options)
    schema = with_provenance(NEIGHBORS_SCHEMA, provenance)
    schema = schema.with_metadata({**schema.metadata, NEIGHBORS_KEY: json.dumps(
        {"k": cfg.k, "index": cfg.index, "index_kind": meta["kind"], "index_count": meta["count"]}).encode()})
    init_ray(cfg.ray_address)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = progress
    threads = max(1, int(cfg.cpus_per_actor))
    ds = ray.data.from_items(items).map_batches(
        NeighborsActor, batch_size=1, batch_format="numpy",
        fn_constructor_args=(cfg.index, dict(cfg.storage_options), cfg.out, cfg.k, cfg.query_batch, schema, threads),
        compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.cpus_per_actor)
    stats = ds.take_all()
    if sorted(str(s["out"]) for s in stats) != [i["out"] for i in items]:
        raise RuntimeError(f"neighbours job finished {len(stats)} of {len(items)} parts")
    t_groups = time.perf_counter()
    strong = read_neighbors(cfg.out, cfg.storage_options, min_score=cfg.threshold)
    groups = near_duplicate_groups(strong, cfg.threshold)
    fs, root = filesystem(cfg.out, dict(cfg.storage_options))
    sink = pa.BufferOutputStream()
    pq.write_table(groups.replace_schema_metadata(with_provenance(GROUPS_SCHEMA, provenance).metadata), sink)
    put_bytes(fs, posixpath.join(root, GROUPS_FILE), sink.getvalue().to_pybytes())
    report = {
        "config": {**asdict(cfg), "storage_options": redact_options(cfg.storage_options)},
        "index_kind": meta["kind"], "index_count": meta["count"],
        "parts": len(stats), "images": sum(int(s["rows"]) for s in stats),
        "failed_rows_skipped": sum(int(s["failed"]) for s in stats),
        "near_duplicate_groups": len(groups), "images_in_groups": int(pc.sum(groups.column("size")).as_py() or 0),
        "actors": sorted({str(s["actor"]) for s in stats}),
        "index_load_s": max((float(s["load_s"]) for s in stats), default=0.0),
        "parts_s": round(sum(float(s["work_s"]) for s in stats), 3),  # read + search + write, all actors
        "groups_s": round(time.perf_counter() - t_groups, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "outputs": {str(s["out"]): str(s["source"]) for s in sorted(stats, key=lambda s: str(s["out"]))},
    }
    put_bytes(fs, posixpath.join(root, REPORT_FILE), json.dumps(report, indent=2, sort_keys=True).encode())
    return report


def _log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
