"""Index update benchmark: `resnet-batch index` following a night's ~10% change, against a full rebuild.

    .venv/bin/python benchmarks/index_update_bench.py [--n 60000] [--part-rows 2000]

Night 1: n clustered 2048-d vectors (tests/helpers/search.clustered_vectors) as embed-output parts with ledger
records, indexed (above 50,000 an IVF index, trained and tuned). Night 2, as a sync leaves an output (about 10%
of it changed): 6% new rows in new parts, 2% of the rows gone from half the parts (rewritten: a new ledger
record each), one whole part deleted. Then the same command (an update: it reads the changed parts only) and, into another folder, a full
build of the same output. Printed: both wall times (whole commands, in subprocesses), what the update said,
and the recall@10 of both indexes against exact search on 500 rows of the output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers.search import brute_force, clustered_vectors, write_logged_part  # noqa: E402


def index(emb: Path, out: Path, *extra: str) -> tuple[float, str]:
    """One `resnet-batch index` command: its wall time and the line it printed."""
    cmd = [sys.executable, "-m", "resnet_batch.cli", "index", "--embeddings", str(emb), "--out", str(out), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        sys.exit(done.stdout + done.stderr)
    return time.perf_counter() - t0, done.stdout.strip()


def recall(folder: Path, vectors: np.ndarray, live: np.ndarray) -> float:
    from resnet_batch.search.index import SimilarityIndex

    idx = SimilarityIndex.open(str(folder))
    rows = live[np.random.default_rng(3).choice(len(live), 500, replace=False)]
    _, exact = brute_force(vectors[live], vectors[rows], 10)
    _, found = idx.search(vectors[rows], 10)
    names = np.array([f"img-{r:07d}.jpg" for r in live], dtype=object)
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(idx.image_ids(found), names[exact])]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--part-rows", type=int, default=2_000)
    ap.add_argument("--work", default=str(REPO / "out" / "bench-index-update"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    emb, n, size = work / "emb", args.n, args.part_rows
    added = n * 6 // 100
    vectors = clustered_vectors(n + added, seed=1, clusters=max(50, n // 100))
    parts = {s: np.arange(start, min(start + size, n)) for s, start in enumerate(range(0, n, size))}
    for s, rows in parts.items():
        write_logged_part(emb, s, [f"img-{r:07d}.jpg" for r in rows], vectors[rows], run=1)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; night 1: {n} vectors in {len(parts)} "
          "parts", flush=True)
    build_s, line = index(emb, work / "index")
    print(f"  {line}", flush=True)

    rng = np.random.default_rng(2)
    last = max(parts)
    (emb / f"part-{last:06d}.parquet").unlink()  # a part deleted
    gone = len(parts.pop(last))
    for s in rng.choice(list(parts), size=len(parts) // 2, replace=False):  # rows gone from rewritten parts
        keep = rng.random(len(parts[s])) > 0.02
        gone += int((~keep).sum())
        parts[s] = parts[s][keep]
        write_logged_part(emb, int(s), [f"img-{r:07d}.jpg" for r in parts[s]], vectors[parts[s]], run=2)
    new = np.arange(n, n + added)
    for i, start in enumerate(range(0, len(new), size)):
        rows = new[start:start + size]
        parts[last + 1 + i] = rows
        write_logged_part(emb, last + 1 + i, [f"img-{r:07d}.jpg" for r in rows], vectors[rows], run=2)
    live = np.sort(np.concatenate(list(parts.values())))
    print(f"night 2: {len(new)} new rows, {gone} rows gone ({(len(new) + gone) / n:.0%} of the output changed)",
          flush=True)
    update_s, update_line = index(emb, work / "index")
    rebuild_s, rebuild_line = index(emb, work / "rebuilt")
    print(f"  update:     {update_s:7.1f} s  {update_line}")
    print(f"  full build: {rebuild_s:7.1f} s  {rebuild_line}")
    print(f"update / full build: {update_s / rebuild_s:.1%} of the time (night 1's build: {build_s:.1f} s); "
          f"recall@10 on 500 rows: updated {recall(work / 'index', vectors, live):.3f}, "
          f"rebuilt {recall(work / 'rebuilt', vectors, live):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
