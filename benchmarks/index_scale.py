"""Index at scale: the streaming `resnet-batch index` over 1M photo-like 2048-d embeddings, and the neighbours job.

    .venv/bin/python benchmarks/index_scale.py [--n 1000000] [--queries 1000] [--neighbors-parts 5]
        [--refine-code TC1024] (the index goes to index-TC1024 beside the default one, on the same parts)

1. Draws n embeddings matched to the product's own embeddings of sample photographs (photo_like.py: mean,
   spectrum, norms, clusters) into float16 embed-output parts of 10,000 rows (out/bench-index/emb), and the
   exact cosine top-10 of 1,000 held-out queries (drawn alike, not in the database) over the stored values.
2. Runs `resnet-batch index` on them in a subprocess: build time, peak RSS (the child's ru_maxrss), index size,
   and the nprobe it tuned with the recall it recorded.
3. Opens the index (memory-mapped): recall@10 of the held-out queries against exact search, latency of one
   query at a time (p50/p99, one thread) and of a batch.
4. Runs the neighbours job (local Ray, one actor with all cores) over the first --neighbors-parts parts and
   reports queries/s; FAISS's own counters split a query's cost into the coarse search and the list scan,
   from which the job is extrapolated to 10M vectors on 16 cores.
Parts and ground truth are kept for reruns (delete out/bench-index to redraw).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from photo_like import PhotoLike, PhotoStats  # noqa: E402

from resnet_batch.search.index import normalize  # noqa: E402
from resnet_batch.search.tuning import ExactTopK, recall_at_k  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
K = 10


def write_parts(folder: Path, n: int, part_rows: int, queries: np.ndarray, stats: PhotoStats,
                gen: PhotoLike) -> tuple[np.ndarray, np.ndarray]:
    """n drawn embeddings as float16 parts; returns the exact (scores, ids) top-K of `queries` over them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from resnet_batch.schema import embedding_array, output_schema, with_provenance

    folder.mkdir(parents=True, exist_ok=True)
    schema = with_provenance(output_schema(embedding_dtype="float16"), stats.provenance)
    exact = ExactTopK(normalize(queries), K)
    rng = np.random.default_rng(7)
    t0 = time.perf_counter()
    for p, start in enumerate(range(0, n, part_rows)):
        m = min(part_rows, n - start)
        x = gen.draw(m, rng).astype(np.float16)
        exact.add(normalize(x.astype(np.float32)), np.arange(start, start + m))
        ids = [f"photos/{i // 1000:05d}/img-{i:08d}.jpg" for i in range(start, start + m)]
        table = pa.table({
            "image_id": ids, "path": [f"/data/{i}" for i in ids], "width": pa.array([640] * m, pa.int32()),
            "height": pa.array([480] * m, pa.int32()), "topk_ids": pa.array([[1]] * m, pa.list_(pa.int32())),
            "topk_labels": [["label"]] * m, "topk_probs": pa.array([[0.5]] * m, pa.list_(pa.float32())),
            "embedding": embedding_array(x, np.ones(m, dtype=bool), "float16"), "status": ["ok"] * m,
            "error": pa.array([None] * m, pa.string())}, schema=schema)
        pq.write_table(table, folder / f".part-{p:06d}.tmp", compression="zstd", row_group_size=8192)
        os.replace(folder / f".part-{p:06d}.tmp", folder / f"part-{p:06d}.parquet")
        if p % 20 == 0:
            print(f"  wrote {start + m} vectors ({time.perf_counter() - t0:.0f} s)", flush=True)
    return exact.result()


def single_query_latency(index, queries: np.ndarray) -> tuple[float, float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], K)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def ivf_cost(index, queries: np.ndarray) -> dict:
    """FAISS's counters over one batch: codes scanned per query, ms per query in the coarse search and the scan."""
    import faiss

    stats = faiss.cvar.indexIVF_stats
    stats.reset()
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    index.search(queries, K + 1)
    wall = (time.perf_counter() - t0) * 1000 / len(queries)
    return {"codes_per_query": stats.ndis / stats.nq, "coarse_ms": stats.quantization_time / stats.nq,
            "scan_ms": stats.search_time / stats.nq, "wall_ms": wall}


def main() -> int:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--part-rows", type=int, default=10_000)
    ap.add_argument("--max-memory", default="4G")
    ap.add_argument("--kind", default="auto", help="passed to `resnet-batch index` (ivf: for a quick small run)")
    ap.add_argument("--refine-code", default="FP16", help="passed to `resnet-batch index` (FP16 or TC1024)")
    ap.add_argument("--neighbors-parts", type=int, default=5, help="parts the neighbours job is timed on")
    ap.add_argument("--work", default=str(REPO / "out" / "bench-index"))
    args = ap.parse_args()
    work = Path(args.work) / str(args.n)
    cores = os.cpu_count()
    print(f"faiss {faiss.__version__}; {cores} cores, load average {os.getloadavg()[0]:.1f}; n={args.n}, "
          f"{args.queries} held-out queries, k={K}", flush=True)

    stats = PhotoStats.measure()
    gen = PhotoLike(stats, n_clusters=max(1, args.n // 11))
    emb, truth_file = work / "emb", work / "truth.npz"
    if not truth_file.exists():
        t0 = time.perf_counter()
        queries = gen.draw(args.queries, np.random.default_rng(99)).astype(np.float16).astype(np.float32)
        truth_scores, truth_ids = write_parts(emb, args.n, args.part_rows, queries, stats, gen)
        np.savez(truth_file, queries=queries, ids=truth_ids, scores=truth_scores)
        print(f"drew {args.n} photo-like vectors into {emb} (float16 parts) and their exact top-{K} in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    z = np.load(truth_file)
    queries, truth_ids = z["queries"], z["ids"]

    idx = work / ("index" if args.refine_code == "FP16" else f"index-{args.refine_code}")
    cmd = [sys.executable, "-m", "resnet_batch.cli", "index", "--embeddings", str(emb), "--out", str(idx),
           "--max-memory", args.max_memory, "--kind", args.kind, "--refine-code", args.refine_code, "--rebuild"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    build_s = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if done.returncode or "ivf" != json.loads((idx / "index.json").read_text())["kind"]:
        print(done.stdout, done.stderr)
        return 1
    print(done.stderr.strip() + "\n" + done.stdout.strip(), flush=True)
    meta = json.loads((idx / "index.json").read_text())

    from resnet_batch.search.index import SimilarityIndex

    index = SimilarityIndex.open(str(idx))
    faiss.omp_set_num_threads(cores)
    t0 = time.perf_counter()
    _, found = index.search(queries, K)
    batch_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    held_out = recall_at_k(list(found), list(truth_ids), K)
    faiss.omp_set_num_threads(1)
    p50, p99 = single_query_latency(index, queries)
    sweep = []
    tuned = index.nprobe
    for nprobe in sorted({max(1, tuned // 2), tuned, tuned * 2}):
        index.set_nprobe(nprobe)
        _, f = index.search(queries, K)
        sweep.append((nprobe, recall_at_k(list(f), list(truth_ids), K)))
    index.set_nprobe(tuned)
    cost = ivf_cost(index.index, normalize(queries))

    t = meta["tuning"]
    size = sum(meta["files"].values())
    print(f"\nindex: {meta['factory']}, nprobe={tuned} tuned on {t['queries']} database queries "
          f"(recall@{K} {t[f'recall_at_{K}']:.4f}, target {t['target_recall']}); PCA {meta['pca']}")
    refine = sum(v for k, v in meta["files"].items() if k.endswith("refine.f16"))
    print(f"{'n':>9} {'build s':>8} {'peak RSS GiB':>12} {'size MiB':>9} {'re-ranking B/vector':>19} "
          f"{'recall@10 held-out':>18} {'p50 ms':>7} {'p99 ms':>7} {'batch ms/q':>10}")
    print(f"{args.n:>9} {build_s:8.1f} {peak_rss / 2**30:12.2f} {size / 2**20:9.1f} {refine / meta['count']:19.0f} "
          f"{held_out:18.4f} {p50:7.3f} {p99:7.3f} {batch_ms:10.3f}")
    print("held-out recall@10 by nprobe: " + ", ".join(f"{p}: {r:.4f}" for p, r in sweep))
    print(f"one query (1 thread): {cost['codes_per_query']:.0f} codes scanned, coarse search {cost['coarse_ms']:.3f} "
          f"ms + list scan {cost['scan_ms']:.3f} ms ({cost['wall_ms']:.3f} ms wall in a batch)", flush=True)

    if not t["target_met"]:
        print("the build missed its recall target: the neighbours job is not timed at this nprobe")
    elif args.neighbors_parts:
        neighbours(args, work, idx, meta, cost)
    return 0


def neighbours(args, work: Path, idx: Path, meta: dict, cost: dict) -> None:
    """The neighbours job on a subset of the parts, and its extrapolation to 10M vectors on 16 cores."""
    import shutil

    import ray

    from resnet_batch.search.spec import IndexSpec
    from resnet_batch.search.neighbors import NeighborsConfig, run_neighbors

    subset, out = work / f"emb-first-{args.neighbors_parts}", work / "neighbors"
    shutil.rmtree(subset, ignore_errors=True)
    subset.mkdir()
    for p in sorted((work / "emb").glob("part-*.parquet"))[:args.neighbors_parts]:
        (subset / p.name).symlink_to(p)
    cores = os.cpu_count()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    r = run_neighbors(NeighborsConfig(index=str(idx), out=str(out), k=K, embeddings=(str(subset),), actors=1,
                                      cpus_per_actor=cores), progress=False)
    ray.shutdown()
    qps = r["images"] / r["parts_s"]
    search_qps = r["images"] / r["search_s"]
    print(f"\nneighbours job: {r['images']} queries (k={K}, nprobe={r['nprobe']}) in {r['wall_s']:.1f} s wall "
          f"(Ray start and index open included); in the actor {qps:.0f} queries/s (read + search + write), "
          f"search alone {search_qps:.0f} queries/s, on {cores} cores at load average {os.getloadavg()[0]:.1f}; "
          f"{r['cpu_ms_per_query']:.2f} CPU-ms a query")
    n10 = 10_000_000
    spec10 = IndexSpec.choose(n10, dim=meta["dim"], pca=meta["pca"]["dims"] if meta["pca"] else 0)
    nlist1, nlist10 = meta["spec"]["nlist"], spec10.nlist
    per_core_ms = r["cpu_ms_per_query"]  # CPU time the actor spent a query (read + search + write), all threads
    other_ms = max(per_core_ms - cost["coarse_ms"] - cost["scan_ms"], 0.0)
    for what, scan_scale in (("same nprobe (FAISS's usual case: nlist ~ sqrt(n))",
                              (n10 / nlist10) / (args.n / nlist1)),
                             ("nprobe grown with nlist (worst case)", n10 / args.n)):
        ms = cost["coarse_ms"] * nlist10 / nlist1 + cost["scan_ms"] * scan_scale + other_ms
        hours = n10 * ms / 1000 / 16 / 3600
        print(f"extrapolated to 10M on 16 cores, {what}: nlist {nlist10}, {ms:.2f} core-ms a query -> "
              f"{hours:.2f} h ({'within' if hours <= 1 else 'over'} the 1 h target)")
    print(f"(measured at n={meta['count']}: {per_core_ms:.2f} core-ms a query = coarse {cost['coarse_ms']:.3f} + scan "
          f"{cost['scan_ms']:.3f} + re-ranking, read, write {other_ms:.3f})")


if __name__ == "__main__":
    sys.exit(main())
