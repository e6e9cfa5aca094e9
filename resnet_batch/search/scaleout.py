"""scaleout module: the index build spread over a Ray cluster: parts scanned, sampled and added in parallel tasks,
their partial indices merged into on-disk inverted lists.

FAISS's recipe for indexes larger than one machine builds comfortably (and autofaiss's): train once, add into
partial indices in parallel, merge the partial inverted lists into one `OnDiskInvertedLists` file that readers
memory-map. Here:
1. scan: one task per group of parts reads each part's provenance, ok-row count and 64-bit id hashes (for the
   duplicate check); the driver keeps O(parts) plus 8 bytes a row of hashes;
2. sample: the same uniform sample as the single-process build (embeddings.sample_rows, same seed), read by
   tasks, each the rows of its parts; the driver trains the projection, the lists and the re-ranking coder;
3. add: one task per group of consecutive parts adds them to a copy of the trained, empty index under the ids
   the single-process build gives them (ok rows numbered in scan order), and writes its partial index, id-map
   rows and re-ranking codes next to the staging folder; it also returns the exact top-11 of the tuning queries
   over its rows;
4. merge: the partial lists into `lists.ivfdata` (faiss.contrib.ondisk.merge_ondisk), the partial id maps and
   re-ranking files appended in id order, the exact top-k merged; nprobe is tuned on the merged index.
The result is the single-process build's index, lists on disk: same ids, same training, same codes.

The partial files are written where every task can reach them: in the staging folder inside a local (or
shared, NFS) --out, else uploaded under the object-store --out and downloaded by the merge. Every path a task is
handed is absolute or a full URI (cluster.worker_uri): a worker runs in its raylet's folder, not the driver's.
"""
from __future__ import annotations

import math
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from resnet_batch.errors import SimilarityIndexError
from resnet_batch.schema import EMBEDDING_DIM, embeddings_to_numpy
from resnet_batch.search.build import (TUNE_K, IdMapWriter, _searcher, _trained_index, _trained_refiner, add_parts,
                                       check_unique_ids, history_entry, image_roots, part_id_hashes, LOG,
                                       tune_index)
from resnet_batch.search.changes import part_stamps
from resnet_batch.search.embeddings import Part, list_parts, ok_chunks, part_provenance, check_provenance, \
    sample_rows
from resnet_batch.search.folder import Staging
from resnet_batch.search.coders import coder_bytes, coder_from_bytes, write_coder
from resnet_batch.search.index import FORMAT, IDS_FILE, IDS_SCHEMA, INDEX_FILE, REFINE_FILE, normalize
from resnet_batch.search.layout import HASH_FILE, LISTS_FILE, faiss_stdout_to_stderr, write_id_lookup
from resnet_batch.search.spec import IndexOptions, IndexSpec, query_node_line
from resnet_batch.search.tuning import ExactTopK
from resnet_batch.storage import display_path, filesystem, protocols

PARTIALS = "_partials"  # sub-folder of the staging folder (or of an object-store --out) for the tasks' files


@dataclass(frozen=True)
class ScaleOut:
    """How a build spreads over Ray: which cluster, how many tasks at once, CPUs (and FAISS threads) a task."""

    address: Optional[str] = None  # None: $RAY_ADDRESS, else a local Ray
    tasks: int = 0  # parts groups of the add pass (0: two per CPU of the cluster)
    cpus_per_task: float = 1.0
    rows_per_task: int = 2_000_000  # an add task holds its rows' codes in memory: at most this many

    def __post_init__(self):
        if self.tasks < 0 or self.cpus_per_task <= 0 or self.rows_per_task < 1:
            raise SimilarityIndexError("--tasks must be >= 0 and --cpus-per-task > 0")


def build_index_ray(uris: Sequence[str], out: str, options: IndexOptions, scale: ScaleOut = ScaleOut(), *,
                    storage_options: Optional[dict] = None, log: Callable[[str], None] = LOG.info,
                    guard: Optional[Callable[[], None]] = None) -> dict:
    """Index every 'ok' embedding under `uris` into the folder `out` with Ray tasks; returns its index.json.
    `guard`: the folder lock's check, before publishing (folder.Staging)."""
    options.check()
    opts = dict(storage_options or {})
    with Staging(out, opts, guard=guard) as stage:
        meta = build_into_ray(stage, uris, options, scale, opts, log)
        meta["history"] = [history_entry(meta, "build", "new index (scaled out on Ray)", meta["build_s"])]
        stage.publish(meta)
    return meta


def build_into_ray(stage: Staging, uris: Sequence[str], options: IndexOptions, scale: ScaleOut, opts: dict,
                   log: Callable[[str], None]) -> dict:
    """The scaled-out build into `stage`; its index.json but for "files" and "history" (as build.build_into)."""
    import faiss
    import ray

    from resnet_batch.cluster import init_ray, worker_uri

    t0 = time.perf_counter()
    init_ray(scale.address)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    stamps = {p.uri: p.stamp for p in part_stamps(uris, opts)}  # before the parts: see part_stamps
    listed = [(worker_uri(uri), path) for uri in uris for path in list_parts(uri, opts)[1]]  # paths: absolute
    scan_tasks = _groups(list(range(len(listed))), 4 * cpus)
    task = ray.remote(num_cpus=scale.cpus_per_task)
    scanned = ray.get([task(_scan_parts).remote([listed[i] for i in g], opts) for g in scan_tasks])
    parts, hashes, provenance, first = [], [], None, None
    for group in scanned:
        for part, prov, h in group:
            if provenance is None:
                provenance, first = prov, part.uri
            check_provenance(prov, part.uri, provenance, first)
            parts.append(part)
            hashes.append(h)
    fs_parts = [(filesystem(p.uri, opts)[0], p) for p in parts]
    row_hashes = check_unique_ids(fs_parts, hashes)
    del hashes
    n = sum(p.ok_rows for p in parts)
    if n == 0:
        raise SimilarityIndexError(f"no embeddings with status 'ok' under {', '.join(uris)}")
    spec = IndexSpec.choose(n, kind=options.kind, dim=int(provenance.get("embedding_dim", EMBEDDING_DIM)),
                            max_memory=options.max_memory, pca=options.pca, flat_max=options.flat_max,
                            target_recall=options.target_recall, refine_code=options.refine_code)
    if spec.kind != "ivf":
        raise SimilarityIndexError(f"{n} vectors make an exact index ({spec.factory}): build it without --ray "
                                   "(one process holds it), or pass --kind ivf")
    scan_s = time.perf_counter() - t0
    log(f"indexing {n} embeddings from {len(parts)} parts on Ray ({nodes} nodes, {cpus} CPUs; scanned in "
        f"{scan_s:.1f} s): {spec.factory}")

    # 2. the sample, read in parallel, assembled in the single-process build's order
    t_sample = time.perf_counter()
    queries = min(options.tune_queries, n)
    counts = [p.ok_rows for p in parts]
    picks = list(zip(sample_rows(counts, spec.train_size, options.seed), sample_rows(counts, queries,
                                                                                     options.seed + 1)))
    offsets = np.cumsum([0, *counts])
    wanted = [i for i, (t, q) in enumerate(picks) if len(t) or len(q)]
    got = ray.get([task(_read_sample_parts).remote([(parts[i], picks[i][0], picks[i][1], int(offsets[i]))
                                                    for i in g], opts) for g in _groups(wanted, 4 * cpus)])
    train = np.concatenate([t for group in got for t, _, _ in group] or [np.empty((0, spec.dim), np.float16)])
    tune_vectors = np.concatenate([q for group in got for _, q, _ in group])
    tune_ids = np.concatenate([i for group in got for _, _, i in group])
    del got
    t_train = time.perf_counter()
    index, pca_info, spec = _trained_index(spec, train, options.seed, n, options)
    refiner = _trained_refiner(train, code=spec.refine_code)
    del train
    train_s = time.perf_counter() - t_train
    log(f"read a sample of {spec.train_size} + {queries} vectors in {t_train - t_sample:.1f} s (parallel), trained "
        f"{spec.factory} in {train_s:.1f} s; adding in parallel tasks ({spec.bytes_per_vector()} bytes a vector in "
        f"the lists: {n * spec.bytes_per_vector() / 2**30:.2f} GiB, {refiner.sa_code_size()} on disk for re-ranking)")

    # 3. add: groups of consecutive parts, ids in scan order, each into its own copy of the trained index
    t_add = time.perf_counter()
    tasks = scale.tasks or 2 * cpus
    tasks = max(tasks, math.ceil(n / scale.rows_per_task))
    groups = _row_groups(counts, tasks)
    partials = Partials.for_stage(stage, opts)
    trained = ray.put(faiss.serialize_index(index))
    coder = ray.put(coder_bytes(refiner))
    tune_ref = ray.put(tune_vectors)
    threads = max(1, int(scale.cpus_per_task))
    refs = [task(_add_group).remote(
        AddTask(number=k, parts=[(i, parts[i]) for i in g], first_id=int(offsets[g[0]]), partials=partials,
                storage_options=opts, threads=threads), trained, coder, tune_ref) for k, g in enumerate(groups)]
    added = ray.get(refs)
    del trained, coder, tune_ref
    add_s = time.perf_counter() - t_add

    # 4. merge
    t_merge = time.perf_counter()
    local = partials.local_copy(stage, len(groups))
    exact = ExactTopK(tune_vectors, TUNE_K + 1)
    for a in added:
        exact.merge(a["exact_scores"], a["exact_ids"])
    merge_partials(index, [os.path.join(local, f"{k:05d}.faiss") for k in range(len(groups))],
                   stage.path(LISTS_FILE))
    if index.ntotal != n:
        raise SimilarityIndexError(f"the merged index holds {index.ntotal} vectors, the embeddings {n}")
    concat_id_maps([os.path.join(local, f"{k:05d}.ids.arrow") for k in range(len(groups))], stage.path(IDS_FILE))
    concat_files([os.path.join(local, f"{k:05d}.f16") for k in range(len(groups))], stage.path(REFINE_FILE))
    partials.remove(stage)
    merge_s = time.perf_counter() - t_merge

    t_tune = time.perf_counter()
    search = _searcher(index, spec, refiner, stage.path(REFINE_FILE))
    tuning = tune_index(index, search, tune_ids, tune_vectors, exact, spec.nlist, options.target_recall)
    log(f"added in {add_s:.1f} s ({len(groups)} tasks), merged into on-disk lists in {merge_s:.1f} s, tuned "
        f"nprobe={tuning.nprobe} (recall@{TUNE_K} {tuning.recall:.4f}) in {time.perf_counter() - t_tune:.1f} s")
    with faiss_stdout_to_stderr():
        faiss.write_index(index, stage.path(INDEX_FILE))
    write_coder(refiner, stage.path)
    write_id_lookup(stage.path(HASH_FILE), row_hashes)
    del row_hashes
    protos = sorted({p for a in added for p in a["roots"]["protocols"]})
    commons = [a["roots"]["common"] for a in added if a["roots"]["common"] is not None]
    common = _common_folder(commons)
    query = spec.query_memory(n, os.path.getsize(stage.path(IDS_FILE)), os.path.getsize(stage.path(REFINE_FILE)))
    meta = {
        "format": FORMAT, "build_id": uuid.uuid4().hex, "generation": 0, "kind": spec.kind, "factory": spec.factory,
        "spec": spec.as_dict(), "metric": "cosine", "count": int(index.ntotal), "dim": spec.dim, "next_id": n,
        "nprobe": tuning.nprobe, "tuning": tuning.as_dict(),
        "pca": pca_info, "max_memory": options.max_memory, "train_size": spec.train_size, "seed": options.seed,
        "options": options.as_dict(), "trained_count": n, "tuned_count": n,
        "provenance": provenance, "sources": [worker_uri(u) for u in uris], "parts": len(parts),
        "part_uris": [p.uri for p in parts], "part_stamps": [stamps.get(p.uri) for p in parts],
        "image_roots": image_roots(uris, opts, {"protocols": protos, "common": common}),
        "sample_s": round(t_train - t_sample, 3), "train_s": round(train_s, 3), "add_s": round(add_s, 3),
        "merge_s": round(merge_s, 3), "scan_s": round(scan_s, 3),
        "scaled_out": {"nodes": nodes, "cpus": cpus, "add_tasks": len(groups),
                       "task_peak_rss": max(a["peak_rss"] for a in added)},
        "query_node": query, "faiss": faiss.__version__, "built_at": time.time(),
    }
    meta["build_s"] = round(time.perf_counter() - t0, 3)
    log(query_node_line(query))
    if not tuning.met:
        log(f"warning: recall@{TUNE_K} {tuning.recall:.3f} even at nprobe={tuning.nprobe}: below the target "
            f"{options.target_recall}; raise --pca (or --pca 0), or lower --target-recall")
    return meta


# -- tasks --------------------------------------------------------------------------------------------------


def _scan_parts(listed: list[tuple[str, str]], opts: dict) -> list[tuple]:
    """[(Part, provenance, id hashes of its ok rows)] of the parts listed as (uri given, path)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from resnet_batch.schema import STATUS_OK

    out = []
    for uri, path in listed:
        fs, _ = filesystem(uri, opts)
        shown = display_path(protocols(fs)[0], path)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            prov = part_provenance(pf.schema_arrow, shown)
            status = pf.read(columns=["status"]).column("status")
        part = Part(shown, path, len(status), int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0))
        out.append((part, prov, part_id_hashes(fs, part)))
    return out


def _read_sample_parts(items: list[tuple], opts: dict) -> list[tuple]:
    """Per (Part, train rows, query rows, first ok-row number): the train rows (float16), the query rows
    (float32) and the queries' ids, in row order (as build._read_sample reads them)."""
    out = []
    for part, t_rows, q_rows, offset in items:
        fs, _ = filesystem(part.uri, opts)
        train, tune, ids, start = [], [], [], 0
        for chunk in ok_chunks(fs, part.path, ["embedding"]):
            end = start + len(chunk)
            for rows, sink in ((t_rows, train), (q_rows, tune)):
                sel = rows[(rows >= start) & (rows < end)]
                if len(sel):
                    sink.append(normalize(embeddings_to_numpy(chunk.column("embedding").take(pa.array(sel - start)))))
                    if sink is tune:
                        ids.append(offset + sel)
            start = end
        dim = int(part_dim(train, tune))
        out.append((np.concatenate(train).astype(np.float16) if train else np.empty((0, dim), np.float16),
                    np.concatenate(tune) if tune else np.empty((0, dim), np.float32),
                    np.concatenate(ids).astype(np.int64) if ids else np.empty(0, np.int64)))
    return out


def part_dim(*lists) -> int:
    for arrays in lists:
        if arrays:
            return arrays[0].shape[1]
    return EMBEDDING_DIM


@dataclass(frozen=True)
class AddTask:
    """One add task: its number, its parts (numbered in the build's part list), the id of its first row."""

    number: int
    parts: list  # [(part number, Part)]
    first_id: int
    partials: "Partials"
    storage_options: dict
    threads: int


def _add_group(t: AddTask, trained: np.ndarray, coder: bytes, tune_vectors: np.ndarray) -> dict:
    """Add a group of parts to a copy of the trained index; write the partial index, id map and re-ranking rows."""
    import resource

    import faiss
    import torch

    faiss.omp_set_num_threads(t.threads)
    torch.set_num_threads(t.threads)
    index = faiss.deserialize_index(trained)
    refiner = coder_from_bytes(coder)
    exact = ExactTopK(tune_vectors, TUNE_K + 1)
    with tempfile.TemporaryDirectory(prefix="resnet-batch-add-") as tmp:
        folder = t.partials.writable(tmp)
        name = os.path.join(folder, f"{t.number:05d}")
        with IdMapWriter(name + ".ids.arrow", name + ".f16", refiner) as sink:
            items = [(filesystem(p.uri, t.storage_options)[0], p, i, None) for i, p in t.parts]
            next_id, roots = add_parts(items, index, sink, t.first_id, exact)
        faiss.write_index(index, name + ".faiss")
        t.partials.publish(folder, t.number)
    scores, ids = exact.result()
    return {"next_id": next_id, "roots": roots, "exact_scores": scores, "exact_ids": ids,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


@dataclass(frozen=True)
class Partials:
    """Where the add tasks leave their files: a folder every task sees (local or shared --out), or an
    object-store prefix (uploaded by the tasks, downloaded by the merge)."""

    folder: Optional[str]  # local or shared path
    uri: Optional[str]  # object-store prefix
    storage_options: dict

    @classmethod
    def for_stage(cls, stage: Staging, opts: dict) -> "Partials":
        if stage.local:
            folder = os.path.abspath(stage.path(PARTIALS))  # the tasks' folder is not the driver's
            os.makedirs(folder, exist_ok=True)
            return cls(folder, None, {})
        return cls(None, posixpath.join(stage.out.rstrip("/"), f"{PARTIALS}-{uuid.uuid4().hex[:12]}"), opts)

    def writable(self, tmp: str) -> str:
        return self.folder or tmp

    def publish(self, folder: str, number: int) -> None:
        if self.uri is None:
            return
        fs, root = filesystem(self.uri, dict(self.storage_options))
        for name in os.listdir(folder):
            if name.startswith(f"{number:05d}."):
                fs.put_file(os.path.join(folder, name), posixpath.join(root, name))

    def local_copy(self, stage: Staging, count: int) -> str:
        """A local folder holding every task's files (downloaded from the object store where they were put)."""
        if self.uri is None:
            return self.folder
        folder = stage.path(PARTIALS)
        os.makedirs(folder, exist_ok=True)
        fs, root = filesystem(self.uri, dict(self.storage_options))
        for k in range(count):
            for ext in ("faiss", "ids.arrow", "f16"):
                fs.get_file(posixpath.join(root, f"{k:05d}.{ext}"), os.path.join(folder, f"{k:05d}.{ext}"))
        return folder

    def remove(self, stage: Staging) -> None:
        shutil.rmtree(stage.path(PARTIALS), ignore_errors=True)
        if self.uri is not None:
            fs, root = filesystem(self.uri, dict(self.storage_options))
            if fs.exists(root):
                fs.rm(root, recursive=True)


# -- merging ------------------------------------------------------------------------------------------------


def merge_partials(trained_index, partial_paths: list[str], lists_path: str) -> None:
    """The partial indices' lists into one on-disk inverted-lists file, set as `trained_index`'s lists."""
    from faiss.contrib.ondisk import merge_ondisk

    with faiss_stdout_to_stderr():
        merge_ondisk(trained_index, partial_paths, lists_path)
    import faiss

    if isinstance(trained_index, faiss.IndexPreTransform):
        trained_index.ntotal = faiss.extract_index_ivf(trained_index).ntotal


def concat_id_maps(paths: list[str], out: str) -> None:
    """Partial id maps (each in id order, the groups consecutive) appended into one Arrow IPC file."""
    with pa.ipc.new_file(out, IDS_SCHEMA) as writer:
        for path in paths:
            with pa.memory_map(path) as source:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    writer.write_batch(reader.get_batch(i))


def concat_files(paths: list[str], out: str) -> None:
    """Files appended into one (the re-ranking rows, in id order)."""
    with open(out, "wb") as sink:
        for path in paths:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, sink, 16 << 20)


def _common_folder(folders: list[str]) -> Optional[str]:
    if not folders:
        return None
    if any(f == "" for f in folders):
        return ""
    try:
        return posixpath.commonpath(folders)
    except ValueError:
        return ""


def _groups(items: list, count: int) -> list[list]:
    """`items` in at most `count` consecutive groups of near-equal size."""
    count = max(1, min(count, len(items)))
    bounds = np.linspace(0, len(items), count + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _row_groups(counts: list[int], tasks: int) -> list[list[int]]:
    """Consecutive part numbers in groups of about sum(counts)/tasks ok rows (a part is never split)."""
    target = max(1, sum(counts) / max(1, tasks))
    groups, current, rows = [], [], 0
    for i, c in enumerate(counts):
        if current and rows + c > target * 1.5:
            groups.append(current)
            current, rows = [], 0
        current.append(i)
        rows += c
        if rows >= target:
            groups.append(current)
            current, rows = [], 0
    if current:
        groups.append(current)
    return groups
