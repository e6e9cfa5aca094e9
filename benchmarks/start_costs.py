"""start_costs: the CPU a run's start pays for each piece, and what an idle Ray worker costs.

    .venv/bin/python benchmarks/start_costs.py [--workers 4] [--seconds 30]

Each import is timed in a fresh interpreter (CPU seconds of that process, after what it needs first), so the
figures are what a driver or a model actor pays at its start: torch; torchvision after torch (what the driver
no longer imports, resnet_batch/torchvision_meta.py); torch._dynamo after torch (what `normal_` on the meta
device imported in every actor and driver before a meta build skipped the initialisation); the model actor's
module (it imports torch in the actor's constructor, not with the module); a meta build of ResNet-50. Then a
local Ray with `--workers` idle worker processes: the CPU each takes over `--seconds`, from /proc/PID/stat.
Then what the start's order and the model's build change, each in fresh interpreters: a local Ray's start
alone and beside torch's import in a thread (one GIL); its stop by `ray.shutdown()` and by the package's
`cluster.stop_ray()`; ResNet-50 in bf16 (batch 32, 2 threads) with its BatchNorms as built and folded
(`architecture.fold_batchnorm`), interleaved.
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


def printed(code: str, *args: str) -> list[str]:
    """The words `code` prints, run with `args` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()


def cpu_of(before: str, timed: str, rounds: int = 3) -> tuple[float, str]:
    """The median CPU seconds of `timed` in fresh interpreters, and which heavy modules it left imported."""
    runs = []
    for _ in range(rounds):
        out = printed(TIMED, before, timed)
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


RAY_START = """
import sys, threading, time
import ray
if sys.argv[1] == "beside-torch":
    threading.Thread(target=lambda: __import__("torch")).start()
t = time.perf_counter()
ray.init(include_dashboard=False, log_to_driver=False)
print(time.perf_counter() - t)
"""

RAY_STOP = """
import sys, time
import ray
from resnet_batch.cluster import stop_ray
ray.init(include_dashboard=False, log_to_driver=False)
t = time.perf_counter()
ray.shutdown() if sys.argv[1] == "ray.shutdown()" else stop_ray()
print(time.perf_counter() - t)
"""

FOLD = """
import sys, time, numpy as np
import resnet_batch.network as network
from resnet_batch.decode import PreprocessSpec
from resnet_batch.weights import random_state_dict
spec, sd = PreprocessSpec.from_weights("IMAGENET1K_V2"), random_state_dict(0)
folded = network.ResNet50Embedder(sd, spec, precision="bf16", threads=2)
network.fold_batchnorm = lambda model: None  # the network as built, every BatchNorm its own pass
built = network.ResNet50Embedder(sd, spec, precision="bf16", threads=2)
x = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
rates = {"as built": [], "folded": []}
for e in (built, folded):
    e.embed(x)
for _ in range(int(sys.argv[1])):
    for name, e in (("as built", built), ("folded", folded)):
        t = time.perf_counter()
        for _ in range(3):
            e.embed(x)
        rates[name].append(96 / (time.perf_counter() - t))
print(*(float(np.median(rates[k])) for k in ("as built", "folded")))
"""


def seconds_of(code: str, *args: str, rounds: int = 3) -> float:
    """The median of what `code` prints (seconds) over fresh interpreters."""
    runs = sorted(float(printed(code, *args)[-1]) for _ in range(rounds))
    return runs[len(runs) // 2]


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
    alone, beside = (seconds_of(RAY_START, how) for how in ("alone", "beside-torch"))
    print(f"start_costs: a local Ray's start: {alone:.2f} s alone, {beside:.2f} s beside torch's import in a thread")
    shutdown, stop = (seconds_of(RAY_STOP, how) for how in ("ray.shutdown()", "stop_ray()"))
    print(f"start_costs: a local Ray's stop: ray.shutdown() {shutdown:.2f} s, cluster.stop_ray() {stop:.2f} s")
    out = printed(FOLD, "3")
    print(f"start_costs: ResNet-50 bf16, batch 32, 2 threads: {float(out[-2]):.1f} img/s as built, "
          f"{float(out[-1]):.1f} img/s with its BatchNorms folded (medians of 3 interleaved rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
