"""The neighbours job on a built index: wall time and the driver's peak RSS with `--quiet` (and whether anything
but the result line was printed), and its near-duplicate groups against the previous driver's algorithm
(a union-find over the string ids of every strong link, recomputed here from the neighbours parts it wrote).

    .venv/bin/python benchmarks/neighbors_scale.py --index out/bench-scaleout/100000/ray2 --threshold 0.998

Then the job's CPU time a query (its `_neighbors.json`), split by FAISS's counters into the coarse search, the
list scan and the rest (re-ranking, reading, writing), extrapolated to 100M and 1B images: the coarse search
grows with the number of lists and the scan with the rows a list holds, as the index spec would choose them,
at the same nprobe. `--reuse` reports on the job an earlier run left in --out instead of running it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = Path(__file__).resolve().parent.parent
PEAK = ("import resource, sys\nfrom resnet_batch.cli import main\nsys.argv[0] = 'resnet-batch'\n"
        "try:\n    code = main(sys.argv[1:])\nfinally:\n"
        "    print('peak_rss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\n"
        "sys.exit(code)")


def old_groups(out: Path, threshold: float) -> list[tuple]:
    """The previous driver's groups: union-find over the string ids of every link >= threshold."""
    import pyarrow.compute as pc

    from resnet_batch.search.neighbors import read_neighbors

    table = read_neighbors(str(out))
    scores = table.column("scores").combine_chunks()
    strong = pc.greater_equal(pc.list_flatten(scores), threshold)
    src = pc.take(table.column("image_id"), pc.filter(pc.list_parent_indices(scores), strong)).to_pylist()
    dst = pc.filter(pc.list_flatten(table.column("neighbor_ids").combine_chunks()), strong).to_pylist()
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(src, dst):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict = {}
    for x in parent:
        members.setdefault(find(x), []).append(x)
    return sorted((tuple(sorted(m)) for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))


def extrapolate(out: Path, index_path: str, sample: int = 1000) -> None:
    """Hours of the neighbours job at 100M and 1B images from the CPU time it spent a query here."""
    import pyarrow.parquet as pq
    from index_scale import ivf_cost

    from resnet_batch.schema import embeddings_to_numpy
    from resnet_batch.search.index import SimilarityIndex, normalize
    from resnet_batch.search.spec import IndexSpec

    report = json.loads((out / "_neighbors.json").read_text())
    index = SimilarityIndex.open(index_path)
    n, nlist, cpu_ms = len(index), index.meta["spec"]["nlist"], report["cpu_ms_per_query"]
    part = pq.read_table(index.meta["part_uris"][0], columns=["embedding"]).slice(0, sample)
    cost = ivf_cost(index.index, normalize(embeddings_to_numpy(part.column("embedding").combine_chunks())))
    rest = max(0.0, cpu_ms - cost["coarse_ms"] - cost["scan_ms"])
    print(f"{cpu_ms:.2f} CPU-ms a query in the job (nprobe {report['nprobe']}, {n // nlist} rows a list); FAISS's "
          f"counters over {sample} rows of its first part, one thread: coarse search {cost['coarse_ms']:.2f} ms, "
          f"list scan {cost['scan_ms']:.2f} ms ({cost['codes_per_query']:,.0f} codes), the rest {rest:.2f} ms "
          f"(re-ranking, reading, writing)")
    for big in (100_000_000, 1_000_000_000):
        spec = IndexSpec.choose(big, max_memory=None)
        ms = cost["coarse_ms"] * spec.nlist / nlist + cost["scan_ms"] * (big / spec.nlist) / (n / nlist) + rest
        hours = ", ".join(f"{big * ms / 1000 / cpus / 3600:.1f} h on {cpus} CPUs" for cpus in (64, 256))
        print(f"extrapolated to {big:,} images ({spec.factory}, {big // spec.nlist:,} rows a list, same nprobe): "
              f"{ms:.2f} CPU-ms a query -> {hours}, from the CPU time a query measured above")


def report_groups(out: Path, threshold: float) -> None:
    """The job's groups against the previous driver's string union-find over the same links."""
    import pyarrow.parquet as pq

    new = pq.read_table(out / "near_duplicates.parquet")
    new_groups = [tuple(g) for g in new.column("image_ids").to_pylist()]
    t1 = time.perf_counter()
    old = old_groups(out, threshold)
    print(f"groups: {len(new_groups)} (int64 components merged in tasks); the previous driver's string "
          f"union-find over the same links ({time.perf_counter() - t1:.1f} s here): {len(old)}; "
          f"equal: {new_groups == old}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--threshold", type=float, default=0.998)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "out" / "bench-neighbors"))
    ap.add_argument("--reuse", action="store_true", help="report on the job an earlier run left in --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.reuse:
        report_groups(out, args.threshold)
        extrapolate(out, args.index)
        return 0
    shutil.rmtree(out, ignore_errors=True)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, "neighbors", "--index", args.index, "--out", str(out),
                           "--threshold", str(args.threshold), "--actors", str(args.actors), "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    err, _, peak = done.stderr.rstrip().rpartition("\n")
    print(done.stdout.strip())
    if done.returncode:
        print(err[-3000:])
        return 1
    print(f"wall {wall:.1f} s, driver peak RSS {int(peak.split()[-1]) / 2**30:.2f} GiB; stderr with --quiet: "
          f"{len(err.strip().splitlines())} lines{' (core_worker line present)' if 'core_worker' in err else ''}")
    report_groups(out, args.threshold)
    extrapolate(out, args.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
