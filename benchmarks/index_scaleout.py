"""The index build scaled out on Ray: one Ray node against a two-node local cluster, and the single-process build,
on the same photo-like vectors: wall time, peak RSS of the largest process, held-out recall@10, bytes a vector.

Draws n photo-like vectors (photo_like.py) into float16 embed-output parts (index_scale.write_parts, with the
exact top-10 of held-out queries), then builds the index three ways with the real command:
  single   `resnet-batch index` (one process)
  1 node   `resnet-batch index --ray` on a local cluster of one node of --cpus-per-node CPUs
  2 nodes  the same on a local cluster of two such nodes (resnet_batch/dev/localcluster.py)
and extrapolates to 100M and 1B from the measured add rate (vectors a CPU-second in the add tasks) and the
measured merge rate (bytes of lists a second), saying which.

    .venv/bin/python benchmarks/index_scaleout.py --n 3000000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from index_scale import write_parts  # noqa: E402
from photo_like import PhotoLike, PhotoStats  # noqa: E402
from resnet_batch.search.tuning import recall_at_k  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
K = 10


def build(label: str, emb: Path, out: Path, extra: list[str], env: dict, reuse: bool = False) -> dict:
    if reuse and (out / "index.json").exists():  # figures of an earlier run: its own build_s, no process RSS
        meta = json.loads((out / "index.json").read_text())
        return {"label": label, "wall": meta["build_s"], "driver_rss": 0, "out": out, "meta": meta,
                "task_rss": meta.get("scaled_out", {}).get("task_peak_rss", 0)}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, "index", "--embeddings", str(emb), "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if done.returncode:
        print(done.stdout, done.stderr[-4000:])
        raise SystemExit(f"{label}: the build failed")
    err, _, peak = done.stderr.rstrip().rpartition("\n")
    meta = json.loads((out / "index.json").read_text())
    tasks = meta.get("scaled_out", {}).get("task_peak_rss", 0)
    print(f"--- {label}\n{err.strip()}\n{done.stdout.strip()}", flush=True)
    return {"label": label, "wall": wall, "driver_rss": int(peak.split()[-1]), "task_rss": tasks, "meta": meta,
            "out": out}


# The command in this process, then its own peak RSS as the last line of stderr (RUSAGE_CHILDREN would mix runs).
PEAK = ("import resource, sys\nfrom resnet_batch.cli import main\nsys.argv[0] = 'resnet-batch'\n"
        "try:\n    code = main(sys.argv[1:])\nfinally:\n"
        "    print('peak_rss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\n"
        "sys.exit(code)")


def held_out_recall(out: Path, queries: np.ndarray, truth: np.ndarray) -> float:
    from resnet_batch.search.index import SimilarityIndex

    index = SimilarityIndex.open(str(out))
    _, found = index.search(queries, K)
    return recall_at_k(list(found), list(truth), K)


def probes_around(tuned: int, nlist: int) -> list[int]:
    """nprobes to measure around a tuned one: half, 8 either side, itself and double (within 1..nlist)."""
    return sorted(p for p in {tuned // 2, tuned - 8, tuned, tuned + 8, 2 * tuned} if 1 <= p <= nlist)


def held_out_curve(out: Path, queries: np.ndarray, truth: np.ndarray) -> None:
    """Held-out recall@10 (mean ± standard error) at nprobes around the tuned one, beside the tuning's own
    curve (its database-row queries) where it tried the same nprobe."""
    from resnet_batch.search.index import SimilarityIndex
    from resnet_batch.search.tuning import recalls

    index = SimilarityIndex.open(str(out))
    tuned = index.nprobe
    tried = {p: r for p, r, _ in index.meta["tuning"]["curve"]}
    print(f"\n{out.name}: nprobe, held-out recall@{K} (± standard error, {len(queries)} queries), the tuning's "
          f"recall ({index.meta['tuning']['queries']} database rows) where it tried that nprobe")
    for p in probes_around(tuned, index.meta["spec"]["nlist"]):
        index.set_nprobe(p)
        r = recalls(list(index.search(queries, K)[1]), list(truth), K)
        print(f"  {p:5d}  {r.mean():.4f} ± {r.std(ddof=1) / np.sqrt(len(r)):.4f}  "
              f"{tried[p] if p in tried else '':>6}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--part-rows", type=int, default=10_000)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--skip-single", action="store_true", help="leave out the single-process build")
    ap.add_argument("--reuse", action="store_true",
                    help="report the builds an earlier run left (their recorded build_s; peak RSS of the tasks only)")
    ap.add_argument("--work", default=str(REPO / "out" / "bench-scaleout"))
    ap.add_argument("--nodes", type=int, nargs="+", choices=(1, 2), default=[1, 2],
                    help="the local clusters to build on (with --reuse, the others' earlier builds are read back)")
    ap.add_argument("--curve", action="store_true",
                    help="also print each build's held-out recall at nprobes around the tuned one")
    ap.add_argument("--draw-only", action="store_true",
                    help="draw the vectors and the held-out truth into --work, then stop (the builds reuse them)")
    args = ap.parse_args()
    work = Path(args.work) / str(args.n)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; n={args.n}, {args.queries} held-out "
          f"queries, k={K}; cluster nodes of {args.cpus_per_node} CPU(s)", flush=True)
    stats = PhotoStats.measure()
    gen = PhotoLike(stats, n_clusters=max(1, args.n // 11))
    emb, truth_file = work / "emb", work / "truth.npz"
    if not truth_file.exists():
        t0 = time.perf_counter()
        queries = gen.draw(args.queries, np.random.default_rng(99)).astype(np.float16).astype(np.float32)
        scores, ids = write_parts(emb, args.n, args.part_rows, queries, stats, gen)
        np.savez(truth_file, queries=queries, ids=ids, scores=scores)
        print(f"drew {args.n} photo-like vectors and their exact top-{K} in {time.perf_counter() - t0:.0f} s",
              flush=True)
    if args.draw_only:
        return 0
    z = np.load(truth_file)
    queries, truth = z["queries"], z["ids"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    runs = []
    if not args.skip_single:
        runs.append(build("single process", emb, work / "single", [], env, args.reuse))
    from resnet_batch.dev.localcluster import LocalCluster

    for nodes in (1, 2):
        if args.reuse and (work / f"ray{nodes}" / "index.json").exists():
            runs.append(build(f"--ray on {nodes} node(s)", emb, work / f"ray{nodes}", [], env, True))
            continue
        if nodes not in args.nodes:
            continue
        with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as root:
            cluster = LocalCluster(Path(root))
            try:
                cluster.start_head(num_cpus=args.cpus_per_node)
                for _ in range(nodes - 1):
                    cluster.add_node(num_cpus=args.cpus_per_node)
                cluster.wait_for_nodes(nodes)
                runs.append(build(f"--ray on {nodes} node(s)", emb, work / f"ray{nodes}",
                                  ["--ray", "--ray-address", cluster.address],
                                  {**cluster.env, "RAY_ADDRESS": cluster.address}))
            finally:
                cluster.stop()
    print(f"\n{'build':<20} {'wall s':>8} {'add s':>7} {'merge s':>8} {'peak RSS GiB (largest process)':>31} "
          f"{'recall@10 held-out':>18} {'bytes/vector':>12}")
    for r in runs:
        m = r["meta"]
        recall = held_out_recall(r["out"], queries, truth)
        largest = max(r["driver_rss"], r["task_rss"])
        print(f"{r['label']:<20} {r['wall']:8.1f} {m['add_s']:7.1f} {m.get('merge_s', 0):8.1f} "
              f"{largest / 2**30:31.2f} {recall:18.4f} {sum(m['files'].values()) / m['count']:12.0f}", flush=True)
    for r in runs if args.curve else []:
        held_out_curve(r["out"], queries, truth)
    ray = [r for r in runs if r["label"].startswith("--ray")]
    if ray:
        m = ray[-1]["meta"]
        per_cpu = m["count"] / (m["add_s"] * m["scaled_out"]["cpus"])  # vectors a CPU-second while adding
        merged = sum(m["files"][f] for f in ("lists.ivfdata", "ids.arrow", "refine.f16"))  # what the merge writes
        merge_rate = merged / max(m["merge_s"], 1e-9)
        per_vector = merged / m["count"]
        print(f"\nmeasured: add {per_cpu:,.0f} vectors a CPU-second (read + project + encode + id map + re-ranking "
              f"codes, 2 nodes); merge {merge_rate / 2**20:.0f} MiB a second (lists, id maps and re-ranking rows "
              f"written by one process: {per_vector:,.0f} bytes a vector)")
        for n in (100_000_000, 1_000_000_000):
            for cpus in (64, 256):
                add_h = n / (per_cpu * cpus) / 3600
                merge_h = n * per_vector / merge_rate / 3600
                print(f"extrapolated to {n:,} on {cpus} CPUs: add {add_h:.1f} h + merge {merge_h:.1f} h "
                      f"({n * per_vector / 2**30:,.0f} GiB written), from the measured add and merge rates above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
