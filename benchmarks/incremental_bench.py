"""Incremental-night benchmark: night 1 embeds a library, night 2 syncs it after it grew and changed.

    .venv/bin/python benchmarks/incremental_bench.py [--photos 2000]

Night 1: `resnet-batch embed` over --photos sample photos (configs/local.yaml: bf16, random weights).
Night 2: 10% new photos (half in existing folders, half in a new one), 1% overwritten with other photos,
1% deleted; the same command again. Printed: both nights' wall time (the whole command), their ratio
(target <= 20%), what night 2 did (embedded / removed / unchanged), and the listing + diff cost per 1,000
unchanged photos. A third run with nothing to do shows the floor.

`--running-ray` runs the nights on a Ray head that is already up (started here with `ray start`, as a
cluster that stays up between nights is), so no night pays Ray's own start.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resnet_batch.dev.sample_data import jpeg_bytes, make_sample_photos, source_photos, variant  # noqa: E402


def night(photos: Path, out: Path, env: dict | None = None) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "resnet_batch.cli", "embed", "--quiet", "--config", str(REPO / "configs/local.yaml"),
           "--input", str(photos), "--output", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(res.stdout[-2000:] + res.stderr[-3000:])
    return wall, json.loads((out / "_run_report.json").read_text())


def grow(photos: Path, n: int, seed: int = 1) -> dict:
    """10% new (half beside the old ones, half in a new folder), 1% overwritten, 1% deleted."""
    rng = np.random.default_rng(seed)
    sources = list(source_photos().values())
    existing = sorted(photos.rglob("*.jpg"))
    folders = sorted({p.parent for p in existing})
    new = n // 10
    for i in range(new):
        folder = folders[i % len(folders)] if i < new // 2 else photos / "night-2"
        folder.mkdir(exist_ok=True)
        (folder / f"new-{i:05d}.jpg").write_bytes(jpeg_bytes(variant(sources[i % len(sources)], rng), 88))
    picks = rng.choice(len(existing), size=2 * (n // 100), replace=False)
    changed, deleted = picks[: n // 100], picks[n // 100:]
    for k in changed:
        existing[k].write_bytes(jpeg_bytes(variant(sources[(k + 3) % len(sources)], rng), 90))
    for k in deleted:
        existing[k].unlink()
    return {"new": new, "changed": len(changed), "deleted": len(deleted)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/resnet-batch-bench/incremental")
    ap.add_argument("--running-ray", action="store_true", help="run the nights on a Ray head already up")
    args = ap.parse_args(argv)
    if not args.running_ray:
        return nights(args, None)
    from resnet_batch.dev.localcluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as root:  # short: Ray's socket paths live under it
        cluster = LocalCluster(Path(root))
        try:
            cluster.start_head(num_cpus=os.cpu_count() or 2)
            print(f"incremental_bench: on a running Ray head at {cluster.address}", flush=True)
            return nights(args, {**cluster.env, "RAY_ADDRESS": cluster.address})
        finally:
            cluster.stop()


def nights(args, env: dict | None) -> int:
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    photos, out = work / "library", work / "out"
    make_sample_photos(photos, args.photos, per_folder=250, seed=3)
    w1, r1 = night(photos, out, env)
    print(f"incremental_bench: night 1: {r1['counts']['this_run']['images']:,} embedded in {w1:.1f}s "
          f"(startup {r1['startup'].get('first_result', 0):.1f}s to the first result)", flush=True)
    print("incremental_bench: night 1 start-up, seconds after the command began: "
          + ", ".join(f"{k} {v:.1f}" for k, v in r1["startup"].items()), flush=True)
    change = grow(photos, args.photos)
    w2, r2 = night(photos, out, env)
    s = r2["sync"]
    print(f"incremental_bench: night 2 ({change['new']} new, {change['changed']} changed, {change['deleted']} "
          f"deleted): {r2['counts']['this_run']['images']:,} embedded, {s['deleted']} removed, {s['unchanged']:,} "
          f"unchanged in {w2:.1f}s = {w2 / w1:.0%} of night 1 (target <= 20%)")
    per_k = (s["listing_s"] + s.get("diff_s", 0.0)) / max(s["unchanged"], 1) * 1000
    print(f"incremental_bench: listing + diff: {s['listing_s'] + s.get('diff_s', 0.0):.2f}s for {s['listed']:,} "
          f"listed = {per_k * 1000:.1f} ms per 1,000 unchanged photos")
    w3, r3 = night(photos, out, env)
    print(f"incremental_bench: night 3 (nothing changed): {w3:.1f}s, {r3['counts']['this_run']['images']} embedded; "
          f"complete={r3['complete']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
