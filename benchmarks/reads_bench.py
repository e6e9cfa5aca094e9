"""reads_bench: read tasks in flight and node-local dispatch on a local multi-node Ray, with the stand-in model.

    .venv/bin/python benchmarks/reads_bench.py --nodes 2 --cpus-per-node 68 --photos 4000 --per-shard 10 \
        --warm --idle-reads --object-store-mib 384 --max-memory-gib 21

A Ray cluster of `--nodes` nodes on loopback (resnet_batch/dev/localcluster.py), each with
`--cpus-per-node` logical CPUs (Ray's --num-cpus may exceed the cores: the reads are then limited by
the scheduler, not by the machine), runs the real pipeline (listing, Ray Data read windows, decode, the
actor pool with one actor per node, part writes, ledger) over tiny JPEGs with a stand-in model that costs
nothing (tests/helpers/standin.py, reached only through the Python API). Printed from the run's
`_run_report.json`: the peak number of read tasks running at once (from the start and end stamps Ray
Data puts on every block), the share of blocks handed to an actor on the node that decoded them, and the
throughput. Before this change a run kept at most 2 windows x 64 = 128 read tasks in flight whatever the
CPUs, and dispatch ignored nodes (1/nodes of the blocks local on average).

Each read task running is a Ray worker process of its own: 106 MiB of private memory each here (Ray's core
worker 59, Ray Data and its imports 46, measured), so the reads in flight cost about READ_WORKER_MIB each
whatever the photos' size; more than 128 of them need ~14 GiB for the read workers alone. The script
estimates the memory of the cluster it is asked for and refuses one over --max-memory-gib (a machine shared
with others: the default 8), and while it runs it samples the memory (PSS) of every process of the cluster
and of the driver, stops the run once they pass that budget, and prints their peak. The nodes get a small
object store (--object-store-mib), and the photos are tiny.

On a machine with far fewer cores than logical CPUs, --warm starts the read workers before the run (Ray
starts them a few at a time) and --idle-reads runs them under SCHED_IDLE, so that they use the CPU the
driver and the actors leave, as reads on a cluster's own CPUs do: otherwise a hundred readers take the
cores from the driver that hands out the reads and the actors that drain their blocks, and the reads in
flight measure the starved consumers, not the scheduler.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DRIVER = r"""
import json, sys, time
import ray
from resnet_batch.config import build_config
from resnet_batch.embed.runner import run
from tests.helpers.standin import StandInEmbedder
warm = int(sys.argv[6])
if warm:  # a worker process per read slot, started before the run (a cluster hours into a night has them)
    ray.init(address=sys.argv[3], log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self):
            self.n = 0

        def arrive(self):
            self.n += 1

        def count(self):
            return self.n

    @ray.remote(num_cpus=1)
    def hold(gate, n):
        ray.get(gate.arrive.remote())
        deadline = time.time() + 600
        while ray.get(gate.count.remote()) < n and time.time() < deadline:
            time.sleep(0.5)

    gate = Gate.remote()
    t = time.time()
    ray.get([hold.remote(gate, warm) for _ in range(warm)])
    print(f"warm: {warm} worker processes up in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
cfg = build_config({"input": {"uri": sys.argv[1], "images_per_shard": int(sys.argv[4])},
                    "model": {"weights": "random", "precision": "fp32"},
                    "compute": {"ray_address": sys.argv[3], "min_actors": int(sys.argv[5]),
                                "max_actors": int(sys.argv[5]), "cpus_per_actor": 1, "batch_size": 256,
                                "decode_batch_size": 16},
                    "output": {"uri": sys.argv[2]}})
report = run(cfg, embedder=StandInEmbedder)
print("REPORT " + json.dumps(report, default=str))
"""


READ_WORKER_MIB = 110  # a read task's worker process (private memory, measured: 106 MiB)
NODE_MIB = 450  # a node's raylet, agents and the stand-in model actor (torch imported)
HEAD_MIB = 500  # the head's GCS and dashboard
DRIVER_MIB = 900  # the driver (torch, Ray, pyarrow)


def estimate_mib(nodes: int, cpus_per_node: int, object_store_mib: int) -> int:
    """The memory a run asks for: a read worker per logical CPU the actors leave, the nodes, the driver."""
    reads = nodes * max(cpus_per_node - 1, 0)
    return reads * READ_WORKER_MIB + nodes * (NODE_MIB + object_store_mib) + HEAD_MIB + DRIVER_MIB


def pss_mib(pids) -> float:
    """The proportional set size of these processes, in MiB (shared pages split between their users)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total / 1024


def _tree(pid: int) -> list[int]:
    """A process and its descendants."""
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo.extend(children.get(q, []))
    return out


def _title(pid: int) -> str:
    """A process's command line as Ray sets it (`ray::ReadShards` for a worker running a read task)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


class MemoryWatch(threading.Thread):
    """Samples the PSS of the cluster's and the driver's processes; over the budget, kills the driver. With
    `idle_reads`, also puts every worker process seen running a read task under SCHED_IDLE (see --idle-reads)."""

    def __init__(self, cluster, budget_mib: float, idle_reads: bool = False):
        super().__init__(daemon=True)
        self.cluster, self.budget, self.idle_reads = cluster, budget_mib, idle_reads
        self.driver = None
        self.peak = 0.0
        self.over = False
        self.done = threading.Event()
        self.idled: set[int] = set()

    def run(self) -> None:
        while not self.done.wait(0.25 if self.idle_reads else 1.0):
            pids = set(self.cluster.processes()) | (set(_tree(self.driver.pid)) if self.driver else set())
            if self.idle_reads:
                for pid in pids - self.idled:
                    if _title(pid).startswith("ray::Read"):  # a read worker stays one (the actors are others)
                        try:
                            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
                            self.idled.add(pid)
                        except OSError:
                            pass
            now = pss_mib(pids)
            self.peak = max(self.peak, now)
            if now > self.budget and self.driver is not None:
                self.over = True
                self.driver.kill()
                return


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=80)
    ap.add_argument("--photos", type=int, default=20_000)
    ap.add_argument("--per-shard", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/resnet-batch-bench")
    ap.add_argument("--object-store-mib", type=int, default=100, help="each node's object store")
    ap.add_argument("--max-memory-gib", type=float, default=8.0,
                    help="refuse a cluster estimated above this, stop a run that passes it")
    ap.add_argument("--idle-reads", action="store_true",
                    help="run the read workers under SCHED_IDLE (they get the CPU the others leave), as soon as "
                         "each is seen reading. With more logical CPUs than cores, a hundred read processes would "
                         "otherwise share the cores evenly with the driver that hands out the reads and the actors "
                         "that take their blocks, starving both (a niceness of 19 is not enough: each reader still "
                         "weighs 1.5 %% of a normal process, a hundred of them more than the driver and an actor "
                         "together); on a cluster those have cores of their own")
    ap.add_argument("--warm", action="store_true",
                    help="start a worker process per read slot before the run, in the driver's job (Ray starts "
                         "workers a few at a time: on two physical cores about one a second, slower than short "
                         "reads finish, so a cold cluster of this size never has all its slots busy at once)")
    args = ap.parse_args(argv)
    from benchmarks.result_path_bench import make_photos
    from resnet_batch.dev.localcluster import LocalCluster

    budget = args.max_memory_gib * 1024
    need = estimate_mib(args.nodes, args.cpus_per_node, args.object_store_mib)
    if need > budget:
        fits = max(1, int((budget - HEAD_MIB - DRIVER_MIB - args.nodes * (NODE_MIB + args.object_store_mib))
                          / READ_WORKER_MIB / args.nodes) + 1)
        print(f"reads_bench: {args.nodes} nodes x {args.cpus_per_node} logical CPUs would need about "
              f"{need / 1024:.1f} GiB ({READ_WORKER_MIB} MiB per read task in flight), over --max-memory-gib "
              f"{args.max_memory_gib:g}; at most --cpus-per-node {fits} fits")
        return 2
    photos = Path(args.workdir) / f"tiny-{args.photos}"
    make_photos(photos, args.photos)
    root = Path(tempfile.mkdtemp(prefix="rb-reads-", dir="/tmp"))
    cluster = LocalCluster(root, object_store_bytes=args.object_store_mib << 20)
    watch = MemoryWatch(cluster, budget, args.idle_reads)
    try:
        cluster.start_head(num_cpus=args.cpus_per_node)
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes(args.nodes)
        t0 = time.perf_counter()
        watch.start()
        watch.driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(photos), str(root / "out"),
                                         cluster.address, str(args.per_shard), str(args.nodes),
                                         str(args.nodes * (args.cpus_per_node - 1) if args.warm else 0)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**cluster.env, "PYTHONPATH": str(REPO)})
        out, err = watch.driver.communicate()
        wall = time.perf_counter() - t0
        watch.done.set()
        if watch.over:
            print(f"reads_bench: stopped after {wall:.0f}s: the cluster and the driver passed {args.max_memory_gib:g} "
                  f"GiB (PSS, estimate {need / 1024:.1f} GiB)")
            return 3
        if watch.driver.returncode:
            raise RuntimeError(out[-2000:] + err[-4000:])
        lines = [line for line in out.splitlines() if line.startswith("REPORT ")]  # Ray may print to stdout too
        if not lines:
            raise RuntimeError("the driver printed no report:\n" + out[-2000:] + err[-4000:])
        r = json.loads(lines[-1][len("REPORT "):])
        print(*[line for line in err.splitlines() if line.startswith("warm:")], sep="\n")
        reads = r["reads"]
        print(f"reads_bench: {args.nodes} nodes x {args.cpus_per_node} logical CPUs, {args.photos:,} photos in "
              f"shards of {args.per_shard} ({args.photos // args.per_shard:,} read tasks), complete={r['complete']}, "
              f"wall {wall:.0f}s, {r['img_per_s']} img/s")
        print(f"reads_bench: peak read tasks in flight {reads['peak_reads_in_flight']} (before: at most 128); "
              f"blocks handed to an actor on their own node: {reads['node_local_share']:.0%} of {reads['blocks']:,} "
              f"(before: about {1 / args.nodes:.0%})")
        print(f"reads_bench: peak memory of the cluster and the driver {watch.peak / 1024:.1f} GiB (PSS; estimate "
              f"{need / 1024:.1f} GiB, object stores {args.object_store_mib} MiB a node)")
    finally:
        watch.done.set()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
