"""Plan benchmark: how much the driver holds while it plans a huge input, and how fast a store is listed.

    .venv/bin/python benchmarks/plan_bench.py [--objects 1000000] [--s3-objects 200000]

1. A local tree of `--objects` empty .jpg files (1,000 folders; made once under --workdir) is planned
   exactly as a run plans a new output: the listing streams into shards of 1,000, each stored in the
   Parquet manifest, nothing else. Printed: the driver's peak memory over its own baseline per path
   (target <= 100 B), the manifest's bytes on disk per path (target <= 30 B), and paths/s.
2. `--s3-objects` objects on a SeaweedFS server on loopback (bulk-loaded with `weed filer.copy`) are
   listed by the job's S3 listing (prefixes walked concurrently, pages handed over as they come):
   keys/s. 0 skips it.
Each measurement runs in a fresh process, so no earlier allocation counts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PLAN = r"""
import json, sys, threading, time
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
from resnet_batch.config import InputConfig
from resnet_batch.embed.listing import list_entries
from resnet_batch.embed.plan import StreamPlanner, detect
from resnet_batch.output.store import OutputStore
import pyarrow  # noqa: F401 (loaded before the baseline, as in a real driver)
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
base = rss()
threading.Thread(target=sample, daemon=True).start()
cfg = InputConfig(uri=sys.argv[1], images_per_shard=1000)
store = OutputStore(sys.argv[2], {})
t0 = time.perf_counter()
listing = list_entries(cfg)
fmt, pages = detect(cfg, listing)
released = [0]
planner = StreamPlanner(cfg, fmt, listing.root, pages, store, release=lambda s: released.__setitem__(0, released[0] + len(s)),
                        close=lambda: None)
planner.start()
planner.done.wait()
seconds = time.perf_counter() - t0
stop.set()
peak[0] = max(peak[0], rss())
if planner.error:
    raise planner.error
print(json.dumps({"paths": planner.images, "shards": released[0], "seconds": seconds, "base": base, "peak": peak[0],
                  "manifest_bytes": planner.manifest.bytes, "pieces": planner.manifest.pieces}))
"""

LIST_S3 = r"""
import json, sys, time
from resnet_batch.config import InputConfig
from resnet_batch.embed.listing import list_entries
cfg = InputConfig(uri=sys.argv[1], storage_options=json.loads(sys.argv[2]))
t0 = time.perf_counter()
n = sum(len(page) for page in list_entries(cfg).pages)
print(json.dumps({"keys": n, "seconds": time.perf_counter() - t0}))
"""


def make_tree(root: Path, n: int, folders: int = 1000) -> None:
    """n empty .jpg files in `folders` sub-folders (skipped when already there)."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(n):
        return
    per = -(-n // folders)
    for d in range(folders):
        folder = root / f"d{d:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(d * per, min(n, (d + 1) * per)):
            os.close(os.open(folder / f"IMG_{i:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    done.write_text(str(n))


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--s3-objects", type=int, default=200_000)
    ap.add_argument("--workdir", default="/tmp/resnet-batch-bench")
    args = ap.parse_args(argv)
    tree = Path(args.workdir) / f"plan-{args.objects}"
    t0 = time.perf_counter()
    make_tree(tree, args.objects)
    print(f"plan_bench: {args.objects:,} files under {tree} ({time.perf_counter() - t0:.0f}s to make)", flush=True)
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        r = child(PLAN, str(tree), str(Path(tmp) / "out"))
    per_path = (r["peak"] - r["base"]) / r["paths"]
    print(f"plan_bench: local tree: {r['paths']:,} paths -> {r['shards']:,} shards in {r['seconds']:.1f}s "
          f"({r['paths'] / r['seconds']:,.0f} paths/s)")
    print(f"plan_bench: driver_bytes_per_path={per_path:.1f} (peak {r['peak'] / 2**20:.0f} MB over a baseline of "
          f"{r['base'] / 2**20:.0f} MB; target <= 100)")
    print(f"plan_bench: manifest_bytes_per_path={r['manifest_bytes'] / r['paths']:.1f} "
          f"({r['manifest_bytes'] / 2**20:.1f} MB in {r['pieces']} Parquet pieces; target <= 30)")
    if args.s3_objects:
        from tests.helpers.s3server import S3Server

        with tempfile.TemporaryDirectory(prefix="plan-bench-s3-") as tmp, S3Server(Path(tmp) / "server") as s3:
            src = Path(tmp) / "objs"
            make_tree(src, args.s3_objects, folders=200)
            s3.make_bucket("plan-bench")
            t0 = time.perf_counter()
            s3.copy_via_filer(src, "plan-bench")
            print(f"plan_bench: loaded {args.s3_objects:,} objects into SeaweedFS in {time.perf_counter() - t0:.0f}s",
                  flush=True)
            r = child(LIST_S3, "s3://plan-bench/objs", json.dumps(s3.storage_options()))
            print(f"plan_bench: s3 listing: {r['keys']:,} keys in {r['seconds']:.1f}s "
                  f"({r['keys'] / r['seconds']:,.0f} keys/s, loopback SeaweedFS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
