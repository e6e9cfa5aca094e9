"""The neighbours job on a built index: wall time and the driver's peak RSS with `--quiet` (and whether anything
but the result line was printed), and its near-duplicate groups against the previous driver's algorithm
(a union-find over the string ids of every strong link, recomputed here from the neighbours parts it wrote).

    .venv/bin/python benchmarks/neighbors_scale.py --index out/bench-scaleout/100000/ray2 --threshold 0.998
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def main() -> int:
    import pyarrow.parquet as pq

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--threshold", type=float, default=0.998)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "out" / "bench-neighbors"))
    args = ap.parse_args()
    out = Path(args.out)
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
    new = pq.read_table(out / "near_duplicates.parquet")
    new_groups = [tuple(g) for g in new.column("image_ids").to_pylist()]
    t1 = time.perf_counter()
    old = old_groups(out, args.threshold)
    print(f"groups: {len(new_groups)} (int64 components merged in tasks); the previous driver's string "
          f"union-find over the same links ({time.perf_counter() - t1:.1f} s here): {len(old)}; "
          f"equal: {new_groups == old}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
