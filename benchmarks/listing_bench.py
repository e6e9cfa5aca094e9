"""Listing benchmark: list >= 100,000 small objects on a local SeaweedFS S3 server and print objects/s.

    .venv/bin/python benchmarks/listing_bench.py [--objects 100000] [--prefixes 100] [--repeat 3]

Starts a SeaweedFS server on loopback (tests/s3server.py), writes the objects under
s3://bench-listing/objs/dNNN/ with `weed filer.copy` (bulk load, far faster than 100k signed PUTs from
Python), then times three ways of listing them:

  list_files   what the job does: the root with a delimiter, then one paginated walk per sub-prefix,
               16 at a time (resnet_batch.storage.list_files)
  fs.find      one sequential paginated ListObjectsV2 walk of the whole prefix (s3fs)
  list_input   the job's whole listing step: list_files + sort + cut into shards
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resnet_batch.config import InputConfig  # noqa: E402
from resnet_batch.listing import list_input  # noqa: E402
from resnet_batch.storage import filesystem, list_files  # noqa: E402
from tests.s3server import S3Server  # noqa: E402

BUCKET = "bench-listing"


def make_objects(root: Path, n: int, prefixes: int) -> None:
    """n tiny .jpg-named files spread evenly over `prefixes` sub-folders of root/objs."""
    for d in range(prefixes):
        (root / "objs" / f"d{d:03d}").mkdir(parents=True, exist_ok=True)
    payload = b"\xff\xd8\xff\xe0 tiny"
    for i in range(n):
        (root / "objs" / f"d{i % prefixes:03d}" / f"img-{i:07d}.jpg").write_bytes(payload)


def timed(fn, repeat: int) -> tuple[list[float], int]:
    seconds, count = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        count = fn()
        seconds.append(time.perf_counter() - t0)
    return seconds, count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--prefixes", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="listing-bench-") as tmp, S3Server(Path(tmp) / "server") as s3:
        src = Path(tmp) / "src"
        t0 = time.perf_counter()
        make_objects(src, args.objects, args.prefixes)
        s3.make_bucket(BUCKET)
        t1 = time.perf_counter()
        s3.copy_via_filer(src / "objs", BUCKET, concurrency=32)
        upload_s = time.perf_counter() - t1
        print(f"wrote {args.objects:,} objects in {args.prefixes} prefixes: local files {t1 - t0:.1f}s, "
              f"upload {upload_s:.1f}s ({args.objects / upload_s:,.0f} objects/s)", flush=True)

        uri = f"s3://{BUCKET}/objs"
        opts = s3.storage_options()
        fs, root = filesystem(uri, opts)
        plain = s3.filesystem()
        runs = {
            "list_files (per-prefix walks, 16 concurrent)": lambda: len(list_files(fs, root)),
            "fs.find (one sequential walk)": lambda: len(plain.find(root, refresh=True)),
            "list_input (list + sort + shards)": lambda: list_input(
                InputConfig(uri=uri, storage_options=opts), progress=False).images,
        }
        print(f"{'method':48s} {'objects':>9s} {'median s':>9s} {'objects/s':>10s}  (median of {args.repeat} runs; best)")
        for name, fn in runs.items():
            seconds, count = timed(fn, args.repeat)
            if count != args.objects:
                raise SystemExit(f"{name} listed {count} objects, expected {args.objects}")
            med = statistics.median(seconds)
            print(f"{name:48s} {count:9,d} {med:9.2f} {count / med:10,.0f}  (best {count / min(seconds):,.0f}/s)",
                  flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
