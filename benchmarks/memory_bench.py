"""Memory benchmark: peak RSS of the driver and of the Ray workers at two dataset sizes.

    .venv/bin/python benchmarks/memory_bench.py --sizes 1000 10000

Runs the embed job (local Ray, bf16, random weights) as a subprocess on N generated photos and samples
/proc every 0.5 s for the whole process tree: the driver, each Ray worker (read/decode tasks, the model
actor) and Ray's own daemons. VmRSS also counts the pages of Ray's shared-memory object store that a
process has touched (bounded by the object store's size, not by N); RssAnon is the process's own
heap. Memory bounded by the streaming window shows as RssAnon peaks that do not grow with N.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _children() -> dict[int, list[int]]:
    kids = defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                kids[ppid].append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """VmRSS counts pages of Ray's shared-memory object store a process has touched; RssAnon is its own heap."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _role(pid: int) -> str:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    for key, role in (("EmbedActor", "model actor"), ("ReadShards", "read/decode task"), ("raylet", "raylet"),
                      ("gcs_server", "gcs"), ("default_worker", "ray worker (idle/other)")):
        if key in cmd:
            return role
    return "other"


def measure(n: int, work: Path) -> dict:
    photos = work / f"photos-{n}"
    if not photos.exists():
        subprocess.run([sys.executable, "-m", "resnet_batch.cli", "sample-data", "--out", str(photos), "-n", str(n)],
                       check=True, cwd=REPO)
    cmd = [sys.executable, "-m", "resnet_batch.cli", "embed", "--config", "configs/local.yaml", "--quiet", "--fresh",
           "--input", str(photos), "--output", str(work / f"out-{n}"), "-o", "model.weights=random"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_driver, peak_total, peak_role, peak_anon = 0.0, 0.0, defaultdict(float), defaultdict(float)
    while proc.poll() is None:
        pids = _tree(proc.pid)
        total = 0.0
        for pid in pids:
            rss = _rss_mb(pid)
            total += _rss_mb(pid, "RssAnon")
            role = "driver" if pid == proc.pid else _role(pid)
            peak_role[role] = max(peak_role[role], rss)
            peak_anon[role] = max(peak_anon[role], _rss_mb(pid, "RssAnon"))
        peak_driver = max(peak_driver, _rss_mb(proc.pid))
        peak_total = max(peak_total, total)
        time.sleep(0.5)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(log[-3000:])
    return {"images": n, "seconds": time.perf_counter() - t0, "driver_mb": peak_driver, "tree_anon_mb": peak_total,
            "roles": dict(peak_role), "anon": dict(peak_anon)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--workdir", default="/tmp/resnet-batch-membench")
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [measure(n, work) for n in a.sizes]
    print("\npeak MB per process role: RSS (includes touched pages of the shared object store) / RssAnon (own heap)")
    print(f"{'images':>8s} {'seconds':>8s} {'driver':>14s} {'model actor':>14s} {'read/decode':>14s} {'tree RssAnon':>13s}")
    for r in rows:
        cell = lambda role: f"{r['roles'].get(role, 0):6.0f} / {r['anon'].get(role, 0):5.0f}"  # noqa: E731
        print(f"{r['images']:8d} {r['seconds']:8.1f} {cell('driver'):>14s} {cell('model actor'):>14s} "
              f"{cell('read/decode task'):>14s} {r['tree_anon_mb']:13.0f}")
    for r in rows:
        print(f"  {r['images']}: " + ", ".join(f"{k}={v:.0f}/{r['anon'].get(k, 0):.0f}" for k, v in sorted(r["roles"].items())))


if __name__ == "__main__":
    main()
