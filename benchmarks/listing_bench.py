"""listing_bench: the input listed in Ray tasks on the loopback S3 server: keys/s with 1, 2 and 4 listing tasks.

`--objects` zero-byte-ish objects in `--folders` folders are bulk-loaded into a SeaweedFS server on loopback
(`weed filer.copy`). The job's own listers (`listing.listing_tasks`: the input's prefixes cut into units,
dealt to N `PrefixLister`s) each run in a Ray task that lists its prefixes and splits the pages by path
hash as a sync does (`syncdiff.split_listing`), so the figure is what a sync's listing step delivers.
For comparison the driver's own listing (`listing.list_entries`: concurrent prefixes on one event loop).

    python benchmarks/listing_bench.py --objects 200000 --tasks 1 2 4
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_tree(root: Path, n: int, folders: int) -> None:
    per = max(1, n // folders)
    for i in range(n):
        d = root / "objs" / f"{2000 + i // (per * 12) % 30}" / f"f{i // per:04d}"
        if i % per == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"IMG_{i:07d}.jpg").write_bytes(b"x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=200_000)
    ap.add_argument("--folders", type=int, default=200)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--cpus", type=int, default=max(4, os.cpu_count() or 2))
    a = ap.parse_args()
    import ray

    from resnet_batch.config import InputConfig
    from resnet_batch.embed.listing import list_entries, listing_tasks
    from resnet_batch.embed.syncdiff import DiffSettings, split_listing
    from tests.helpers.s3server import S3Server

    with tempfile.TemporaryDirectory(prefix="listing-bench-") as tmp, S3Server(Path(tmp) / "server") as s3:
        src = Path(tmp) / "src"
        make_tree(src, a.objects, a.folders)
        s3.make_bucket("listing-bench")
        t0 = time.perf_counter()
        s3.copy_via_filer(src / "objs", "listing-bench")
        print(f"listing_bench: loaded {a.objects:,} objects in {a.folders} folders into SeaweedFS in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        opts = s3.storage_options()
        uri = "s3://listing-bench/objs"
        cfg = InputConfig(uri=uri, storage_options=opts, format="folder")
        t0 = time.perf_counter()
        n = sum(len(p) for p in list_entries(cfg).pages)
        dt = time.perf_counter() - t0
        print(f"listing_bench: driver listing (one event loop): {n:,} keys in {dt:.1f}s = {n / dt:,.0f} keys/s",
              flush=True)
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        s = DiffSettings(input=cfg, fmt="folder", root="listing-bench/objs", output_uri=tmp, output_options={},
                         retry_window_s=60.0, run=1, partitions=8, move_partitions=8)
        split = ray.remote(split_listing).options(num_cpus=1, num_returns=s.partitions + 1)
        # as many workers as the most tasks, warm (their imports are not the listing's cost)
        ray.get([split.remote(s, lister)[0] for lister in listing_tasks(uri, opts, max(a.tasks))])
        for tasks in a.tasks:
            t0 = time.perf_counter()
            listers = listing_tasks(uri, opts, tasks)
            infos = ray.get([split.remote(s, lister)[0] for lister in listers])
            dt = time.perf_counter() - t0
            n = sum(i["listed"] for i in infos)
            print(f"listing_bench: {len(listers)} listing task(s): {n:,} keys in {dt:.1f}s = {n / dt:,.0f} keys/s "
                  f"(prefix discovery included)", flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
