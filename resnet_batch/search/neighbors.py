"""neighbors module: a Ray job writing every image's top-k neighbours (itself excluded) and near-duplicate groups.

The parts are listed by the driver and their footers checked in parallel tasks. Each actor opens the index
memory-mapped (one copy per node in the page cache) with the tuned nprobe, turns embeddings parts into
neighbours parts and writes them itself; it returns per-part counts to the driver and keeps the part's
near-duplicate components (union-find on int64 id hashes, as stars) in the object store, where a tree of merge
tasks joins them into the groups. The driver holds O(parts): the plan, a reference and a few counts a part;
it never sees a link and never re-lists the output.
"""
from __future__ import annotations

import json
import os
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.redact import safe_uri
from resnet_batch.config import redact_options
from resnet_batch.search.embeddings import list_parts, read_ok_rows
from resnet_batch.errors import ConfigError, OutputError, RunFailed
from resnet_batch.search.index import SimilarityIndex, read_meta
from resnet_batch.provenance import check_compatible
from resnet_batch.schema import embeddings_to_numpy, with_provenance
from resnet_batch.output.store import OutputStore, Ownership, parse_part, part_name
from resnet_batch.storage import display_path, filesystem, protocols

log = logging.getLogger(__name__)

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
NEIGHBORS_REPORT_FILE = "_neighbors.json"
MARKER_FILE = "_NEIGHBORS"  # written before any part: this folder is a neighbours output (safe to clear)
NEIGHBORS_KEY = b"resnet_batch.neighbors"  # Parquet metadata: k and the index the table was searched in
NEIGHBORS_OUTPUT = Ownership(
    marks=(MARKER_FILE, NEIGHBORS_REPORT_FILE),
    files=lambda n: parse_part(n) is not None or n in (GROUPS_FILE, NEIGHBORS_REPORT_FILE),
    refusal=lambda shown, names: OutputError(
        f"--out {shown} is not empty ({', '.join(sorted(names)[:3]) + (', ...' if len(names) > 3 else '')}) and is "
        "not a neighbours output; choose a new or empty folder"))


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


COMPONENTS_SCHEMA = pa.schema([  # near-duplicate components as stars: each image linked to its component's root
    pa.field("node", pa.int64(), nullable=False),  # the image's 64-bit id hash (layout.id_hashes)
    pa.field("root", pa.int64(), nullable=False),  # the smallest node of its component
    pa.field("score", pa.float32()),  # the weakest link of the component so far
    pa.field("image_id", pa.string()),
])


def near_duplicate_groups(neighbors: pa.Table, threshold: float) -> pa.Table:
    """Connected components of the links with score >= threshold (groups of two or more), largest first."""
    return groups_from_components(part_components(neighbors, threshold))


def part_components(neighbors: pa.Table, threshold: float) -> pa.Table:
    """The components of one part's links at or above `threshold`, as stars of int64 ids (COMPONENTS_SCHEMA):
    what a neighbours worker returns for its part, in place of the links (a burst of 30 photos is 30 rows,
    not 30 x k links)."""
    from resnet_batch.search.layout import id_hashes

    scores = neighbors.column("scores").combine_chunks()
    parent_rows = pc.list_parent_indices(scores)
    flat_scores = pc.list_flatten(scores)
    strong = pc.greater_equal(flat_scores, pa.scalar(threshold, pa.float32()))
    src = pc.take(neighbors.column("image_id"), pc.filter(parent_rows, strong)).to_pylist()
    dst = pc.filter(pc.list_flatten(neighbors.column("neighbor_ids").combine_chunks()), strong).to_pylist()
    edge_scores = pc.filter(flat_scores, strong).to_numpy(zero_copy_only=False).astype(np.float32)
    names = np.array(src + dst, dtype=object)
    hashes = id_hashes(list(names))
    n = len(src)
    return _stars(hashes[:n], hashes[n:], edge_scores, hashes, names)


def merge_components(tables: list) -> pa.Table:
    """Components of several parts (or of earlier merges) joined where they share an image: the union-find of
    the neighbours job, on int64 ids, in the merge tasks (the driver only passes references)."""
    star = pa.concat_tables([t.cast(COMPONENTS_SCHEMA) for t in tables]) if tables else COMPONENTS_SCHEMA.empty_table()
    node, root = star.column("node").to_numpy(), star.column("root").to_numpy()
    score = star.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    return _stars(node, root, score, node, star.column("image_id").to_numpy(zero_copy_only=False))


def _stars(a: np.ndarray, b: np.ndarray, scores: np.ndarray, ids: np.ndarray, names: np.ndarray) -> pa.Table:
    """Connected components of the edges a-b (int64 ids; `ids`/`names` say each id's image_id) as stars."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(a):
        return COMPONENTS_SCHEMA.empty_table()
    nodes, first = np.unique(ids, return_index=True)
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (ia, ib)), shape=(len(nodes), len(nodes)))
    count, label = connected_components(graph, directed=False)
    root = np.full(count, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(root, label, nodes)
    weakest = np.full(count, np.inf, dtype=np.float32)
    np.minimum.at(weakest, label[ia], scores)
    return pa.table({"node": nodes, "root": root[label], "score": weakest[label],
                     "image_id": pa.array(list(np.asarray(names, dtype=object)[first]), pa.string())},
                    schema=COMPONENTS_SCHEMA)


def groups_from_components(star: pa.Table) -> pa.Table:
    """The near-duplicate groups table from components: members sorted, largest group first."""
    members: dict[int, list] = {}
    weakest: dict[int, float] = {}
    for root, image_id, score in zip(star.column("root").to_pylist(), star.column("image_id").to_pylist(),
                                     star.column("score").to_pylist()):
        members.setdefault(root, []).append(image_id)
        weakest[root] = score
    groups = sorted(((sorted(m), weakest[r]) for r, m in members.items() if len(m) > 1),
                    key=lambda g: (-len(g[0]), g[0][0]))
    return pa.table({"group_id": pa.array(range(len(groups)), pa.int32()),
                     "size": pa.array([len(g) for g, _ in groups], pa.int32()),
                     "image_ids": [g for g, _ in groups],
                     "min_score": pa.array([w for _, w in groups], pa.float32())}, schema=GROUPS_SCHEMA)


def strong_links(table: pa.Table, threshold: float) -> pa.Table:
    """The rows of a neighbours table whose best score reaches `threshold` (what the groups are built from)."""
    table = table.filter(pc.greater(pc.list_value_length(table.column("scores")), 0))
    return table.filter(pc.greater_equal(pc.list_element(table.column("scores"), 0), threshold))


@dataclass(frozen=True)
class NeighborsActorSettings:
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
    """Ray actor: opens the index once (memory-mapped), then turns each embeddings part into a neighbours part."""

    def __init__(self, settings: NeighborsActorSettings):
        import faiss

        faiss.omp_set_num_threads(settings.threads)
        t0 = time.perf_counter()
        self.index = SimilarityIndex.open(settings.index_uri, settings.storage_options)
        if settings.nprobe:
            self.index.set_nprobe(settings.nprobe)
        self.load_s = time.perf_counter() - t0
        self.actor_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.out = OutputStore(settings.out_uri, dict(settings.storage_options))
        self.s = settings

    def part(self, source: str, name: str) -> tuple[dict, pa.Table]:
        """One embeddings part into its neighbours part (written here); returns its counts and timings, and the
        near-duplicate components of its links (int64 ids), which go to the merge tasks, not to the driver."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        fs, path = filesystem(str(source), self.s.storage_options)
        with fs.open(path, "rb") as f:
            total = pq.ParquetFile(f).metadata.num_rows
        rows = read_ok_rows(fs, path, ["image_id", "embedding"])
        t_search = time.perf_counter()
        table = neighbors_rows(self.index, rows.column("image_id").to_pylist(),
                               embeddings_to_numpy(rows.column("embedding")), self.s.k, self.s.query_batch)
        search_s = time.perf_counter() - t_search
        self.out.write(str(name), table.replace_schema_metadata(self.s.schema.metadata), compression="zstd")
        components = part_components(table, self.s.threshold)
        stats = {"out": str(name), "source": str(source), "rows": len(table), "failed": total - len(rows),
                 "work_s": time.perf_counter() - t0, "search_s": search_s, "cpu_s": time.process_time() - cpu0,
                 "actor": self.actor_id, "load_s": self.load_s, "linked": len(components)}
        return stats, components


def _merge_task(*tables: pa.Table) -> pa.Table:
    return merge_components(list(tables))


def _groups_task(star: pa.Table, out_uri: str, storage_options: dict, provenance: dict) -> tuple[int, int]:
    """The near-duplicate groups from the merged components, written as GROUPS_FILE; (groups, images in them)."""
    groups = groups_from_components(star)
    OutputStore(out_uri, dict(storage_options)).write(
        GROUPS_FILE, groups.replace_schema_metadata(with_provenance(GROUPS_SCHEMA, provenance).metadata),
        compression="snappy")
    return len(groups), int(pc.sum(groups.column("size")).as_py() or 0)


def _part_provenance(sources: list[str], storage_options: dict) -> list[tuple[str, dict]]:
    """(part uri, provenance) of each part: its Parquet footer only."""
    from resnet_batch.search.embeddings import part_provenance

    out = []
    for uri in sources:
        fs, path = filesystem(uri, dict(storage_options))
        with fs.open(path, "rb") as f:
            out.append((uri, part_provenance(pq.ParquetFile(f).schema_arrow, uri)))
    return out


def plan_parts(cfg: NeighborsConfig, meta: dict, parallel: bool = False) -> tuple[list[dict], dict, list[str]]:
    """One work item per embeddings part (output part-NNNNNN.parquet), after checking it matches the index:
    the parts are listed here (O(parts)), their footers read in parallel Ray tasks when `parallel`."""
    from resnet_batch.search.embeddings import check_provenance

    sources = list(cfg.embeddings) or list(meta["sources"])
    uris = []
    for source in sources:
        fs, paths = list_parts(source, cfg.storage_options)
        uris += [display_path(protocols(fs)[0], p) for p in paths]
    if parallel:
        import ray

        task = ray.remote(num_cpus=0.25)(_part_provenance)
        size = max(1, len(uris) // 64)
        found = [x for group in ray.get([task.remote(uris[i:i + size], cfg.storage_options)
                                         for i in range(0, len(uris), size)]) for x in group]
    else:
        found = _part_provenance(uris, cfg.storage_options)
    provenance, first = (found[0][1], found[0][0]) if found else (meta["provenance"], cfg.index)
    for uri, prov in found:
        check_provenance(prov, uri, provenance, first)
    check_compatible(meta["provenance"], provenance,
                     f"embeddings {', '.join(sources)} were made with a different setup than the index {cfg.index}")
    items = [{"source": uri, "out": part_name(i)} for i, uri in enumerate(uris)]
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
    store = OutputStore(uri, dict(storage_options))
    store.invalidate()
    if store.fs.isfile(store.root):
        raise OutputError(f"--out {uri} is a file, not a folder")
    store.clear(NEIGHBORS_OUTPUT)
    store.write(MARKER_FILE, about)


def read_neighbors(uri: str, storage_options: Optional[dict] = None, min_score: Optional[float] = None) -> pa.Table:
    """All parts of a neighbours table; with `min_score`, only rows whose best neighbour scores at least that."""
    fs, paths = list_parts(uri, storage_options)
    tables = []
    for p in paths:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f).cast(NEIGHBORS_SCHEMA)
        tables.append(table if min_score is None else strong_links(table, min_score))
    return pa.concat_tables(tables) if tables else NEIGHBORS_SCHEMA.empty_table()


MERGE_FAN_IN = 16  # component tables a merge task joins


def run_neighbors(cfg: NeighborsConfig, progress: bool = True) -> dict:
    """Run the job: neighbours parts through a pool of Ray actors (each writes its parts and keeps its part's
    near-duplicate components in the object store), the components merged by a tree of tasks into the groups;
    the driver holds the plan and one reference and a few counts a part."""
    import ray

    from resnet_batch.cluster import init_ray, worker_uri

    t0 = time.perf_counter()
    meta = read_meta(cfg.index, cfg.storage_options)
    init_ray(cfg.ray_address)
    items, provenance, sources = plan_parts(cfg, meta, parallel=True)
    check_out(cfg.out, [("embeddings", s) for s in sources] + [("index", cfg.index)], cfg.storage_options)
    nprobe = cfg.nprobe or meta.get("nprobe")
    if progress:
        log.info(f"neighbours: {len(items)} parts against {meta['factory']} index {safe_uri(cfg.index)} ({meta['count']} "
                 f"images{f', nprobe={nprobe}' if nprobe else ''}), k={cfg.k}")
    about = {"k": cfg.k, "index": safe_uri(cfg.index), "index_kind": meta["kind"], "index_count": meta["count"],
             "nprobe": nprobe}
    prepare_output(cfg.out, cfg.storage_options, about)
    schema = with_provenance(NEIGHBORS_SCHEMA, provenance)
    schema = schema.with_metadata({**schema.metadata, NEIGHBORS_KEY: json.dumps(about).encode()})
    settings = NeighborsActorSettings(index_uri=worker_uri(cfg.index), out_uri=worker_uri(cfg.out), storage_options=dict(cfg.storage_options),
                             k=cfg.k, threshold=cfg.threshold, query_batch=cfg.query_batch, nprobe=cfg.nprobe,
                             schema=schema, threads=max(1, int(cfg.cpus_per_actor)))
    # Plain actors with their (small) settings inline: no constructor arguments in the object store, so no
    # core_worker warning about restarting such actors, and nothing printed that `--quiet` did not ask for.
    actor_cls = ray.remote(NeighborsActor).options(num_cpus=cfg.cpus_per_actor)
    actors = [actor_cls.remote(settings) for _ in range(min(cfg.actors, max(1, len(items))))]
    stats, components, queue, running = [], [], list(reversed(items)), {}
    for actor in actors:
        if queue:
            item = queue.pop()
            stat_ref, comp_ref = actor.part.options(num_returns=2).remote(item["source"], item["out"])
            running[stat_ref] = actor
            components.append(comp_ref)
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        actor = running.pop(done[0])
        stats.append(ray.get(done[0]))
        if progress and (len(stats) % max(1, len(items) // 10) == 0 or len(stats) == len(items)):
            log.info(f"neighbours: {len(stats)}/{len(items)} parts")
        if queue:
            item = queue.pop()
            stat_ref, comp_ref = actor.part.options(num_returns=2).remote(item["source"], item["out"])
            running[stat_ref] = actor
            components.append(comp_ref)
    for actor in actors:
        ray.kill(actor)
    if sorted(str(s["out"]) for s in stats) != [i["out"] for i in items]:
        raise RunFailed(f"neighbours job finished {len(stats)} of {len(items)} parts")
    t_groups = time.perf_counter()
    merge = ray.remote(num_cpus=1)(_merge_task)
    refs = components
    while len(refs) > 1:
        refs = [merge.remote(*refs[i:i + MERGE_FAN_IN]) for i in range(0, len(refs), MERGE_FAN_IN)]
    star = refs[0] if refs else ray.put(COMPONENTS_SCHEMA.empty_table())
    n_groups, in_groups = ray.get(ray.remote(num_cpus=1)(_groups_task).remote(
        star, worker_uri(cfg.out), dict(cfg.storage_options), provenance))
    out = OutputStore(cfg.out, dict(cfg.storage_options))
    images = sum(int(s["rows"]) for s in stats)
    search_s = sum(float(s["search_s"]) for s in stats)
    report = {
        "config": {**asdict(cfg), "storage_options": redact_options(cfg.storage_options)},
        "index_kind": meta["kind"], "index_factory": meta["factory"], "index_count": meta["count"],
        "nprobe": nprobe, "parts": len(stats), "images": images,
        "failed_rows_skipped": sum(int(s["failed"]) for s in stats),
        "near_duplicate_groups": n_groups, "images_in_groups": in_groups,
        "linked_images_by_part": sum(int(s["linked"]) for s in stats),
        "actors": sorted({str(s["actor"]) for s in stats}),
        "index_load_s": max((float(s["load_s"]) for s in stats), default=0.0),
        "parts_s": round(sum(float(s["work_s"]) for s in stats), 3),  # read + search + write, all actors
        "search_s": round(search_s, 3),  # the searches alone, all actors
        "search_ms_per_query": round(1000 * search_s / max(images, 1), 4),
        "cpu_s": round(sum(float(s["cpu_s"]) for s in stats), 3),  # CPU time of the actors' part work, all threads
        "cpu_ms_per_query": round(1000 * sum(float(s["cpu_s"]) for s in stats) / max(images, 1), 4),
        "groups_s": round(time.perf_counter() - t_groups, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "outputs": {str(s["out"]): safe_uri(str(s["source"])) for s in sorted(stats, key=lambda s: str(s["out"]))},
    }
    out.write(NEIGHBORS_REPORT_FILE, report)
    return report
