"""GPU throughput benchmark: model-only img/s, then the embed job end to end with CPU decode and with GPU decode.

    python benchmarks/gpu_bench.py --out out/gpu-check/gpu_bench.json      # on a CUDA machine
    python benchmarks/gpu_bench.py --smoke                                 # a tiny CPU run of the same code

Input: ImageNet-size JPEGs (500x375 to 800x600, made from scikit-image's photographs): a pool of
unique images, hard-linked up to --images files. Weights are seeded random (no download); the
throughput does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resnet_batch.dev.sample_data import make_sample_photos  # noqa: E402


def make_dataset(root: Path, unique: int, total: int, per_folder: int = 1000) -> Path:
    """`total` JPEG files under root/photos (hard links onto `unique` distinct photos made in parallel)."""
    pool_dir, photos = root / "pool", root / "photos"
    workers = max(1, min(os.cpu_count() or 1, 16))
    per = -(-unique // workers)
    with ProcessPoolExecutor(workers) as ex:
        parts = list(ex.map(_make_part, [(pool_dir / f"p{k:02d}", per, k) for k in range(workers)]))
    sources = [p for part in parts for p in part]
    for i in range(total):
        folder = photos / f"shard-{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
        os.link(sources[i % len(sources)], folder / f"img-{i:07d}.jpg")
    return photos


def _make_part(args) -> list[Path]:
    out, n, seed = args
    return make_sample_photos(out, n, per_folder=n, seed=seed)


def model_only(device: str, precision: str, batch_size: int, iters: int, compile: bool = False) -> dict:
    """Images/s of ResNet50Embedder.embed on uint8 batches: from pinned host memory, and already on the device."""
    import torch

    from resnet_batch.decode import PreprocessSpec
    from resnet_batch.network import ResNet50Embedder
    from resnet_batch.weights import random_state_dict

    spec = PreprocessSpec.from_weights("IMAGENET1K_V2")
    embedder = ResNet50Embedder(random_state_dict(0), spec, precision=precision, device=device, compile=compile)
    host = np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)
    resident = torch.from_numpy(host).to(device)
    result = {"device": device, "precision": precision, "batch_size": batch_size, "compile": compile}
    for name, batch in (("host_uint8", host), ("device_uint8", resident)):
        for _ in range(3):  # warm-up: cudnn.benchmark picks its kernels, torch.compile compiles
            embedder.embed(batch)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            emb, _ = embedder.embed(batch)
        _sync(device)
        result[f"img_per_s_{name}"] = round(iters * batch_size / (time.perf_counter() - t0), 1)
    return result


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def end_to_end(photos: Path, out: Path, *, device: str, gpu_decode: bool, precision: str, batch_size: int,
               actors: int, gpus_per_actor: float) -> dict:
    """One `run()` of the embed job; the run report's speed and stage figures."""
    from resnet_batch.config import build_config
    from resnet_batch.embed.runner import run

    cfg = build_config({
        "input": {"uri": str(photos), "images_per_shard": 1000, "jpeg_draft": True},
        "model": {"weights": "random", "precision": precision, "channels_last": True},
        "compute": {"batch_size": batch_size, "min_actors": actors, "max_actors": actors,
                    "gpus_per_actor": gpus_per_actor, "cpus_per_actor": 1.0, "decode_cpus": 1.0,
                    "decode_batch_size": 64, "gpu_decode": gpu_decode, "device": device},
        "output": {"uri": str(out)},
    })
    report = run(cfg, fresh=True, progress=False)
    return {"gpu_decode": gpu_decode, "actors": actors, "gpus_per_actor": gpus_per_actor,
            "images": report["counts"]["this_run"]["images"], "ok": report["counts"]["ok"],
            "device": report["device"], "img_per_s": report["img_per_s"],
            "steady_img_per_s": report.get("steady_img_per_s"), "seconds": report["seconds"],
            "stages": report["stages"], "complete": report["complete"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--unique", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--model-iters", type=int, default=40)
    p.add_argument("--compile", action="store_true", help="also time the model with torch.compile")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: checks the script itself")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.images, args.unique, args.batch_size, args.model_iters = 48, 16, 8, 2
        args.precision = "fp32" if device == "cpu" else args.precision
    elif device == "cpu":
        print("no CUDA device: run with --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    results: dict = {"gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                     "cpus": os.cpu_count(), "torch": torch.__version__}
    _emit(results)
    results["model_only"] = [model_only(device, args.precision, args.batch_size, args.model_iters)]
    if args.compile:
        results["model_only"].append(model_only(device, args.precision, args.batch_size, args.model_iters, True))
    _emit(results)

    root = Path(tempfile.mkdtemp(prefix="resnet-batch-bench-"))
    try:
        t0 = time.perf_counter()
        photos = make_dataset(root, args.unique, args.images)
        results["dataset"] = {"images": args.images, "unique": args.unique,
                              "seconds": round(time.perf_counter() - t0, 1)}
        results["end_to_end"] = []
        # GPU decode: two actors share the GPU, so one decodes while the other runs the model.
        runs = ((False, 1, 1.0), (True, 1, 1.0) if args.smoke else (True, 2, 0.5))
        for gpu_decode, actors, share in runs:
            results["end_to_end"].append(end_to_end(
                photos, root / f"out-{gpu_decode}", device=device, gpu_decode=gpu_decode, precision=args.precision,
                batch_size=args.batch_size, actors=actors, gpus_per_actor=share))
            shutil.rmtree(root / f"out-{gpu_decode}", ignore_errors=True)
            _emit(results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if all(r["complete"] for r in results["end_to_end"]) else 1


def _emit(results: dict) -> None:
    """Print what is known so far (a run cut short by a timeout still shows the finished parts)."""
    print("gpu_bench:", json.dumps(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
