"""Result-path benchmark: what the driver carries, and what writing costs, when the model costs nothing.

    .venv/bin/python benchmarks/result_path_bench.py [--sizes 20000 100000]

A 2-node Ray cluster on loopback (resnet_batch/dev/localcluster.py; each node 2 logical CPUs, one model actor each)
runs the real pipeline (listing, Ray Data reads, decode, the actor pool, part writes, ledger, reconcile)
over tiny JPEGs, with a stand-in model that returns deterministic embeddings at no compute cost
(tests/helpers/standin.py, reached only through the Python API). For each size it prints

  driver_bytes_per_image   what came back to the driver per image (the records of the parts; target <= 64)
  driver_peak_rss          the driver process's peak RSS (the 100k run should be <= 1.1x the 20k run)
  rows/s                   images per second through the whole pipeline
  write_us_per_row         CPU-side cost of assembling, encoding and uploading parts, per row (per core)
  parts by node            which nodes' processes wrote the parts (none by the driver's pid)
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DRIVER = r"""
import json, sys
from resnet_batch.config import build_config
from resnet_batch.embed.runner import run
from tests.helpers.standin import StandInEmbedder
cfg = build_config({"input": {"uri": sys.argv[1], "images_per_shard": 1000},
                    "model": {"weights": "random", "precision": "fp32"},
                    "compute": {"ray_address": sys.argv[3], "min_actors": 2, "max_actors": 2, "cpus_per_actor": 1,
                                "batch_size": 256, "decode_batch_size": 64},
                    "output": {"uri": sys.argv[2]}})
report = run(cfg, embedder=StandInEmbedder)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"report": report, "hwm": hwm}, default=str))
"""


def make_photos(root: Path, n: int) -> None:
    """n tiny distinct JPEGs (48x32) in folders of 1,000 (made once)."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(n):
        return
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = (rng.random((32, 48, 3)) * 255).astype("uint8")
    for i in range(n):
        folder = root / f"f{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        im = base.copy()
        im[i % 32, :, i % 3] = (i * 37) % 256  # each image differs
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=80)
        (folder / f"img-{i:07d}.jpg").write_bytes(buf.getvalue())
    done.write_text(str(n))


def part_writers(out: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for p in out.glob("part-*.parquet"):
        writer = json.loads(pq.read_metadata(p).metadata[b"resnet_batch.writer"])
        key = f"{writer['node_id'][:12]}:{writer['pid']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--workdir", default="/tmp/resnet-batch-bench")
    args = ap.parse_args(argv)
    from resnet_batch.dev.localcluster import LocalCluster

    results = {}
    root = Path(tempfile.mkdtemp(prefix="rb-rp-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        cluster.start_head(num_cpus=2, resources={"head_node": 1})
        cluster.add_node(num_cpus=2, resources={"second_node": 1})
        for n in args.sizes:
            photos = Path(args.workdir) / f"tiny-{n}"
            t0 = time.perf_counter()
            make_photos(photos, n)
            print(f"result_path_bench: {n:,} tiny JPEGs ready ({time.perf_counter() - t0:.0f}s)", flush=True)
            out = root / f"out-{n}"
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", DRIVER, str(photos), str(out), cluster.address],
                                 capture_output=True, text=True, env={**cluster.env, "PYTHONPATH": str(REPO)})
            wall = time.perf_counter() - t0
            if res.returncode:
                raise RuntimeError(res.stdout[-2000:] + res.stderr[-4000:])
            got = json.loads(res.stdout.strip().splitlines()[-1])
            r = got["report"]
            images = r["counts"]["this_run"]["images"]
            writers = part_writers(out)
            driver_pid = r["driver"]["pid"]
            results[n] = got["hwm"]
            print(f"result_path_bench: n={n:,} complete={r['complete']} wall={wall:.1f}s "
                  f"rows/s={images / r['seconds']['pipeline']:,.0f} (steady {r['steady_img_per_s'] or 0:,.0f})")
            print(f"result_path_bench: n={n:,} driver_bytes_per_image={r['driver']['bytes_per_image']} "
                  f"driver_peak_rss={got['hwm'] / 2**20:.0f}MB")
            print(f"result_path_bench: n={n:,} write_us_per_row={r['stages']['write_s'] / images * 1e6:.1f} "
                  f"decode_us_per_row={r['stages']['decode_s'] / images * 1e6:.1f}")
            print(f"result_path_bench: n={n:,} parts by writer (node:pid) {writers}; nodes="
                  f"{len({w.split(':')[0] for w in writers})}; by the driver pid {driver_pid}: "
                  f"{sum(v for w, v in writers.items() if w.endswith(f':{driver_pid}'))}")
        if len(results) >= 2:
            small, large = min(results), max(results)
            print(f"result_path_bench: driver peak RSS {large:,} vs {small:,} images: "
                  f"{results[large] / results[small]:.2f}x (target <= 1.1)")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
