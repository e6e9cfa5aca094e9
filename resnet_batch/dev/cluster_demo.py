"""cluster_demo module: `make cluster-demo`, the embed job on a 2-node Ray cluster on this machine.

    python -m resnet_batch.dev.cluster_demo [--photos data/sample] [--output out/cluster-demo] [-o KEY=VALUE ...]

Starts a head and a second node on 127.0.0.1 (localcluster.LocalCluster: own temp dirs and ports,
token auth with a private token file), submits jobs/embed.py with `ray job submit --working-dir .`
and streams the job's log (its summary ends with `per node: ...`), then prints how many images each
node embedded, from the output's `_run_report.json`, and stops the nodes it started, also on Ctrl-C,
SIGTERM or a failure (whose Ray logs it keeps). Sample photos are written to --photos first when that
folder holds none.
Exit status: 0 when the job succeeded, 1 when it did not, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from resnet_batch.dev.localcluster import LocalCluster

NODE_CPUS = 3  # logical CPUs per node: one model actor (2) and one read/decode task (1)
JOB_SETTINGS = (  # two actors that each need 2 of a node's 3 CPUs: one lands on each node
    "compute.min_actors=2", "compute.max_actors=2", "compute.cpus_per_actor=2", "compute.torch_threads=1",
    "input.images_per_shard=32",
)


def say(msg: str) -> None:
    print(f"cluster-demo: {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m resnet_batch.dev.cluster_demo",
                                description="the embed job on a 2-node Ray cluster on this machine")
    p.add_argument("--photos", default="data/sample", help="input folder; sample photos are written there when it "
                                                           "holds none (default data/sample, as `make demo`)")
    p.add_argument("-n", type=int, default=200, help="sample photos to write when --photos holds none (default 200)")
    p.add_argument("--output", default="out/cluster-demo", help="output folder (default out/cluster-demo)")
    p.add_argument("--config", default="configs/local.yaml", help="run config, relative to the working dir")
    p.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="passed on to the job (after the demo's own settings, so it wins)")
    p.add_argument("--working-dir", default=".", help="what the job gets (`ray job submit --working-dir`): "
                                                      "this project's root (default .)")
    return p


def ensure_photos(photos: Path, n: int) -> None:
    if photos.is_dir() and any(p.is_file() for p in photos.rglob("*")):
        return
    from resnet_batch.dev.sample_data import make_sample_photos

    make_sample_photos(photos, n)
    say(f"wrote {n} sample photos under {photos}")


def submit_command(cluster: LocalCluster, job_id: str, args: argparse.Namespace, photos: Path, output: Path,
                   working_dir: Path) -> list[str]:
    """`ray job submit` arguments for the embed job (paths absolute: the job runs in a copy of the working dir)."""
    settings = [arg for kv in (*JOB_SETTINGS, *args.overrides) for arg in ("-o", kv)]
    return ["job", "submit", "--address", cluster.dashboard, "--working-dir", str(working_dir),
            "--submission-id", job_id, "--",
            "python", "jobs/embed.py", "--config", args.config, "--input", str(photos), "--output", str(output),
            "--fresh", "--progress-every", "10", *settings]


def per_node_lines(report: dict, nodes: list[dict]) -> list[str]:
    """One line per node of the cluster (head first): its role, id and the images it embedded."""
    counts = report.get("per_node") or {}
    known = sorted(nodes, key=lambda n: not n.get("is_head_node"))
    ids = [n["node_id"] for n in known] + sorted(set(counts) - {n["node_id"] for n in known})
    roles = {n["node_id"]: "head" if n.get("is_head_node") else "second node" for n in known}
    return [f"  {roles.get(i, 'node'):<12} {i[:12]}  {counts.get(i, 0):>6,} images" for i in ids]


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM / SIGHUP: stop the nodes on the way out, as on Ctrl-C


def main(argv: Optional[list[str]] = None) -> int:
    from resnet_batch.errors import honour_interrupts

    honour_interrupts()  # started from a background shell, SIGINT would be ignored: Ctrl-C must stop the demo
    args = build_parser().parse_args(argv)
    working_dir = Path(args.working_dir).resolve()
    if not (working_dir / "jobs" / "embed.py").is_file():
        print(f"error: {working_dir} holds no jobs/embed.py: run this from the project's root, or pass "
              "--working-dir", file=sys.stderr)
        return 2
    photos, output = Path(args.photos).resolve(), Path(args.output).resolve()
    ensure_photos(photos, args.n)
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    handlers[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    root = Path(tempfile.mkdtemp(prefix="rb-demo-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = LocalCluster(root)
    failed = False  # a failed job keeps the nodes' temp dirs: Ray's logs are there
    try:
        say(f"starting a head and a second node on 127.0.0.1, {NODE_CPUS} CPUs each (temp dirs and auth token "
            f"under {root})")
        cluster.start_head(NODE_CPUS)
        cluster.add_node(NODE_CPUS)
        nodes = cluster.wait_for_nodes(2)
        say(f"cluster up: {len(nodes)} nodes, dashboard {cluster.dashboard}, token auth on")
        job_id = f"resnet-batch-demo-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = submit_command(cluster, job_id, args, photos, output, working_dir)
        say(f"$ RAY_AUTH_TOKEN_PATH={cluster.token_file} ray {shlex.join(cmd)}")
        cluster.ray(*cmd, capture=False, timeout=None)
        status = cluster.job_status(job_id)
        say(f"job {job_id}: {status or 'not found (the submission failed, see above)'}")
        report_file = output / "_run_report.json"
        if status != "SUCCEEDED" or not report_file.exists():
            failed = True
            return 1
        say(f"images per node ({report_file}):")
        for line in per_node_lines(json.loads(report_file.read_text()), nodes):
            print(line, flush=True)
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as err:  # a node did not start
        failed = True
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the nodes running
        count = len(cluster.processes())
        cluster.stop(keep_logs=failed)
        left = cluster.processes()
        say(f"stopped the {len(cluster.sessions)} node(s) it started ({count} processes)" if not left else
            f"warning: {len(left)} process(es) of the cluster are still running: {left}")
        if failed:
            say(f"Ray's logs of both nodes are kept in {cluster.temp_dir}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
