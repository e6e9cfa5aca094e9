"""Throughput benchmark: model-only ceiling vs the resnet-batch job vs the peers, same photos, one run.

    .venv/bin/python benchmarks/embed_bench.py --images 400 --precision bf16 --rounds 3

The model-only ceiling is measured in both ResNet-50 layouts: torchvision's v1.5 (IMAGENET1K_V1/V2, random
weights) and v1 (IMAGENET1K_KERAS: the stride on a downsampling block's first 1x1 conv, so its 3x3 conv runs on
a quarter of the positions). --keras adds the job with the IMAGENET1K_KERAS weights (converted once per machine).

Prints, per contender, the wall-clock of the whole process (start-up included), end-to-end img/s,
steady-state img/s (after the first result) and the ratio to the model-only ceiling. Rounds are
interleaved and medians reported. Peers come from ../shared/peers when that folder exists.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

MODEL_ONLY = """
import sys, time, numpy as np, torch
from resnet_batch.decode import PreprocessSpec
from resnet_batch.network import ResNet50Embedder
from resnet_batch.layouts import MSRA_V1, TORCHVISION
from resnet_batch.weights import random_state_dict
n, bs, precision, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
layout = {"v1.5": TORCHVISION, "v1": MSRA_V1}[sys.argv[5]]  # speed does not depend on the weights' values
e = ResNet50Embedder(random_state_dict(0), PreprocessSpec.from_weights("IMAGENET1K_V2"), precision=precision,
                     threads=threads, layout=layout)
x = np.random.default_rng(0).integers(0, 256, (bs, 224, 224, 3), dtype=np.uint8)
from torch.utils.flop_counter import FlopCounterMode
with FlopCounterMode(display=False) as flops:  # the work itself, whatever else the machine is doing
    e.embed(x[:1])
for _ in range(2):
    e.embed(x)
done, t0, c0 = 0, time.perf_counter(), time.process_time()
while done < n:
    b = min(bs, n - done)
    emb, logits = e.embed(x[:b])
    torch.softmax(logits, 1).topk(5)
    done += b
print(f"img_per_s={done / (time.perf_counter() - t0):.2f} cpu_ms_per_img={1000 * (time.process_time() - c0) / done:.1f} "
      f"gflop_per_img={flops.get_total_flops() / 1e9:.3f}")
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return wall, r.stdout + r.stderr


def field(text: str, name: str) -> float | None:
    m = re.findall(rf"{name}=([0-9.]+)", text)
    return float(m[-1]) if m else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/resnet-batch-bench")
    p.add_argument("--peers", default=str(REPO.parent / "shared" / "peers"))
    p.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    p.add_argument("--keras", action="store_true", help="also the job with model.weights=IMAGENET1K_KERAS (v1)")
    p.add_argument("--layouts-only", action="store_true", help="only the model-only ceiling, in both layouts")
    p.add_argument("--running-ray", action="store_true",
                   help="also the job joining a Ray head started once before the rounds (a cluster that stays up)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="only the contenders whose name contains one of these (e.g. resnet-batch 'torch DataLoader')")
    a = p.parse_args()

    work = Path(a.workdir)
    photos = work / f"photos-{a.images}"
    if not photos.exists():
        subprocess.run([PY, "-m", "resnet_batch.cli", "sample-data", "--out", str(photos), "-n", str(a.images)],
                       check=True, cwd=REPO)
    peers = Path(a.peers)
    have_peers = (peers / "torch_loop.py").exists()

    head = None
    if a.running_ray:
        import tempfile

        from resnet_batch.dev.localcluster import LocalCluster

        head = LocalCluster(Path(tempfile.mkdtemp(prefix="rb-eb-", dir="/tmp")))
        head.start_head(num_cpus=os.cpu_count() or 2)
        head.wait_for_nodes(1)

    def ours(weights="random", cluster=None):
        out = work / f"out-resnet-batch-{weights}{'-running' if cluster else ''}"
        join = ["-o", f"compute.ray_address={cluster.address}"] if cluster else []
        wall, log = timed([PY, "-m", "resnet_batch.cli", "embed", "--config", a.config, "--quiet", "--fresh",
                           "--input", str(photos), "--output", str(out), "-o", f"model.weights={weights}",
                           "-o", f"model.precision={a.precision}", "-o", f"compute.batch_size={a.batch_size}",
                           "-o", f"compute.torch_threads={a.threads}", *join], env=cluster.env if cluster else None)
        rep = json.loads((out / "_run_report.json").read_text())
        assert rep["counts"]["ok"] == a.images, rep["counts"]
        return {"wall_s": wall, "img_per_s": a.images / wall, "steady": rep["steady_img_per_s"],
                "first_result_s": rep["startup"].get("first_result"), "busy": rep["stages"]["model_busy_fraction"],
                "startup": rep["startup"]}

    def model_only(layout="v1.5"):
        def go():
            _, log = timed([PY, "-c", MODEL_ONLY, str(a.images), str(a.batch_size), a.precision, str(a.threads),
                            layout])
            return {"steady": field(log, "img_per_s"), "cpu_ms": field(log, "cpu_ms_per_img"),
                    "gflop": field(log, "gflop_per_img")}
        return go

    def peer(script, *extra):
        def go():
            wall, log = timed([PY, str(peers / script), "--input", str(photos), "--output", str(work / f"out-{script}"),
                               "--precision", a.precision, "--batch-size", str(a.batch_size), *extra])
            return {"wall_s": wall, "img_per_s": field(log, "images") / wall,
                    "steady": field(log, "steady_img_per_s"), "first_result_s": field(log, "first_batch_s")}
        return go

    contenders = {"model-only (ready tensors)": model_only("v1.5"), "model-only, v1 layout": model_only("v1")}
    if not a.layouts_only:
        contenders["resnet-batch"] = ours
        if head is not None:
            contenders["resnet-batch, running Ray head"] = lambda: ours(cluster=head)
    if a.keras and not a.layouts_only:
        contenders["resnet-batch, IMAGENET1K_KERAS (v1)"] = lambda: ours("IMAGENET1K_KERAS")
    if have_peers:
        contenders["peer: ray docs example"] = peer("ray_docs_example.py")
        contenders["peer: ray docs, actor 2 threads"] = peer("ray_docs_example.py", "--actor-threads", str(a.threads))
        contenders["peer: torch DataLoader loop"] = peer("torch_loop.py")
    if a.only:
        contenders = {k: v for k, v in contenders.items() if any(o in k for o in a.only)}
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    try:
        for r in range(a.rounds):
            for name, fn in contenders.items():
                results[name].append(fn())
                print(f"round {r + 1}: {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    finally:
        if head is not None:
            head.stop()

    def med(name, key):
        vals = [x[key] for x in results[name] if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    ceiling = med("model-only (ready tensors)", "steady") if "model-only (ready tensors)" in results else None
    print(f"\n{a.images} photos, {a.precision}, batch {a.batch_size}, {a.threads} torch threads, "
          f"{a.rounds} round(s), medians; cpu_count={os.cpu_count()}")
    print(f"{'contender':34s} {'wall_s':>8s} {'img/s':>8s} {'steady':>8s} {'xceil':>6s} {'first_s':>8s}")
    for name in contenders:
        wall, ips, steady, first = (med(name, k) for k in ("wall_s", "img_per_s", "steady", "first_result_s"))
        fmt = lambda v, w=8, d=2: f"{v:{w}.{d}f}" if v is not None else f"{'-':>{w}s}"  # noqa: E731
        ratio = steady / ceiling if steady and ceiling else None
        print(f"{name:34s} {fmt(wall)} {fmt(ips)} {fmt(steady)} {fmt(ratio, 6)} {fmt(first)}")
    for name in [n for n in ("model-only (ready tensors)", "model-only, v1 layout") if n in results]:
        print(f"{name}: {med(name, 'cpu_ms'):.1f} CPU-ms per image (all threads, median), "
              f"{med(name, 'gflop'):.3f} GFLOP per image")
    loop = "peer: torch DataLoader loop"
    for name in ("resnet-batch", "resnet-batch, running Ray head"):
        if not results.get(name):
            continue
        print(f"{name}: model busy fraction {med(name, 'busy')}; start-up (last round, s after the command "
              "began): " + ", ".join(f"{k} {v:.1f}" for k, v in results[name][-1]["startup"].items()))
        if results.get(loop):
            print(f"{name}: whole command at {med(loop, 'wall_s') / med(name, 'wall_s'):.2f}x the plain loop's "
                  "speed (>= 1: at least as fast)")


if __name__ == "__main__":
    main()
