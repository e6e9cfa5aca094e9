"""start_costs: the CPU a run's start pays for each piece, and what an idle Ray worker costs.

    .venv/bin/python benchmarks/start_costs.py [--workers 4] [--seconds 30]

Each import is timed in a fresh interpreter (CPU seconds of that process, after what it needs first), so the
figures are what a driver or a model actor pays at its start: torch; torchvision after torch (what the driver
no longer imports, resnet_batch/torchvision_meta.py); torch._dynamo after torch (what `normal_` on the meta
device imported in every actor and driver before a meta build skipped the initialisation); the model actor's
module (it imports torch in the actor's constructor, not with the module); a meta build of ResNet-50. Then a
local Ray with `--workers` idle worker processes: the CPU each takes over `--seconds`, from /proc/PID/stat.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STEPS = [  # (what, done first, timed)
    ("import torch", "", "import torch"),
    ("import torchvision (after torch)", "import torch", "import torchvision"),
    ("import torch._dynamo (after torch)", "import torch", "import torch._dynamo"),
    ("import resnet_batch.embed.model (torch left out)", "", "import resnet_batch.embed.model"),
    ("meta build of ResNet-50 (after torch)",
     "import torch; from resnet_batch.architecture import build_resnet; from resnet_batch.layouts import TORCHVISION",
     "build_resnet(TORCHVISION, device='meta')"),
]

TIMED = """
import sys, time
exec(sys.argv[1])
t = time.process_time()
exec(sys.argv[2])
print(time.process_time() - t, "torch._dynamo" in sys.modules, "torch" in sys.modules)
"""


def cpu_of(before: str, timed: str, rounds: int = 3) -> tuple[float, str]:
    """The median CPU seconds of `timed` in fresh interpreters, and which heavy modules it left imported."""
    runs = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", TIMED, before, timed], capture_output=True, text=True,
                             check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
        runs.append((float(out[0]), f"torch._dynamo {'in' if out[1] == 'True' else 'not in'} sys.modules, "
                                    f"torch {'in' if out[2] == 'True' else 'not in'}"))
    runs.sort()
    return runs[len(runs) // 2]


def process_cpu(pids) -> dict:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    return out


def idle_workers(n: int, seconds: float) -> tuple[int, float, float]:
    """(idle workers seen, CPU share of a core each, CPU share of the whole local Ray and driver)."""
    import ray

    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False,
             _system_config={"idle_worker_killing_time_threshold_ms": 300_000, "num_workers_soft_limit": n})

    @ray.remote
    def hold():
        time.sleep(1.0)

    ray.get([hold.remote() for _ in range(n)])
    time.sleep(5)
    procs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    procs[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    ours = [p for p, cmd in procs.items() if "ray" in cmd and (cmd.startswith("ray::") or "/ray/" in cmd)]
    idle = [p for p in ours if procs[p].startswith("ray::IDLE")]
    a = process_cpu(ours)
    time.sleep(seconds)
    b = process_cpu(ours)
    ray.shutdown()
    per_idle = sum(b[p] - a[p] for p in idle if p in a and p in b) / max(1, len(idle)) / seconds
    whole = sum(b[p] - a[p] for p in b if p in a) / seconds
    return len(idle), per_idle, whole


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    a = ap.parse_args(argv)
    for what, before, timed in STEPS:
        cpu, left = cpu_of(before, timed)
        print(f"start_costs: {what:50s} {cpu:5.2f} CPU s  ({left})")
    n, each, whole = idle_workers(a.workers, a.seconds)
    print(f"start_costs: {n} idle Ray worker processes: {each:.2%} of a core each; the whole idle local Ray "
          f"(GCS, raylet, agents, workers): {whole:.1%} of a core, over {a.seconds:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
