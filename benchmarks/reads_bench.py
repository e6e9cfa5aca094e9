"""reads_bench: read tasks in flight and node-local dispatch on a local multi-node Ray, with the stand-in model.

    .venv/bin/python benchmarks/reads_bench.py --nodes 2 --cpus-per-node 80 --photos 20000 --per-shard 20

A Ray cluster of `--nodes` nodes on loopback (resnet_batch/dev/localcluster.py), each with
`--cpus-per-node` logical CPUs (Ray's --num-cpus may exceed the cores: the reads are then limited by
the scheduler, not by the machine), runs the real pipeline (listing, Ray Data read windows, decode, the
actor pool with one actor per node, part writes, ledger) over tiny JPEGs with a stand-in model that costs
nothing (tests/helpers/standin.py, reached only through the Python API). Printed from the run's
`_run_report.json`: the peak number of read tasks running at once (from the start and end stamps Ray
Data puts on every block), the share of blocks handed to an actor on the node that decoded them, and the
throughput. Before this change a run kept at most 2 windows x 64 = 128 read tasks in flight whatever the
CPUs, and dispatch ignored nodes (1/nodes of the blocks local on average).

Each read task is a Ray worker process (~200 MB here): more CPUs than 128 shards' worth needs a machine
with the memory for that many workers.
"""
from __future__ import annotations

import argparse
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
cfg = build_config({"input": {"uri": sys.argv[1], "images_per_shard": int(sys.argv[4])},
                    "model": {"weights": "random", "precision": "fp32"},
                    "compute": {"ray_address": sys.argv[3], "min_actors": int(sys.argv[5]),
                                "max_actors": int(sys.argv[5]), "cpus_per_actor": 1, "batch_size": 256,
                                "decode_batch_size": 16},
                    "output": {"uri": sys.argv[2]}})
report = run(cfg, embedder=StandInEmbedder)
print(json.dumps(report, default=str))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=80)
    ap.add_argument("--photos", type=int, default=20_000)
    ap.add_argument("--per-shard", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/resnet-batch-bench")
    args = ap.parse_args(argv)
    from benchmarks.result_path_bench import make_photos
    from resnet_batch.dev.localcluster import LocalCluster

    photos = Path(args.workdir) / f"tiny-{args.photos}"
    make_photos(photos, args.photos)
    root = Path(tempfile.mkdtemp(prefix="rb-reads-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        cluster.start_head(num_cpus=args.cpus_per_node)
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes(args.nodes)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", DRIVER, str(photos), str(root / "out"), cluster.address,
                              str(args.per_shard), str(args.nodes)],
                             capture_output=True, text=True, env={**cluster.env, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - t0
        if res.returncode:
            raise RuntimeError(res.stdout[-2000:] + res.stderr[-4000:])
        r = json.loads(res.stdout.strip().splitlines()[-1])
        reads = r["reads"]
        print(f"reads_bench: {args.nodes} nodes x {args.cpus_per_node} logical CPUs, {args.photos:,} photos in "
              f"shards of {args.per_shard} ({args.photos // args.per_shard:,} read tasks), complete={r['complete']}, "
              f"wall {wall:.0f}s, {r['img_per_s']} img/s")
        print(f"reads_bench: peak read tasks in flight {reads['peak_reads_in_flight']} (before: at most 128); "
              f"blocks handed to an actor on their own node: {reads['node_local_share']:.0%} of {reads['blocks']:,} "
              f"(before: about {1 / args.nodes:.0%})")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
