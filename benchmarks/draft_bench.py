"""Reduced-size JPEG decoding (Pillow draft): decode speed and how much the embeddings move.

    .venv/bin/python benchmarks/draft_bench.py --images 200 [--weights /path/r50.pth]

Decodes the same generated photos (500x375..800x600, as in the demo) with and without draft on one
core, then embeds both crops with the same ResNet-50 (fp32) and prints the cosine similarity between
the two embeddings of each photo and how often the top-1 label changes.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from resnet_batch.config import ModelConfig
from resnet_batch.decode import PreprocessSpec, decode_image
from resnet_batch.network import ResNet50Embedder
from resnet_batch.dev.sample_data import make_sample_photos
from resnet_batch.weights import resolve_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--weights", default="random")
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        datas = [q.read_bytes() for q in make_sample_photos(Path(d), a.images, seed=11)]
    spec = PreprocessSpec.from_weights("IMAGENET1K_V2")
    crops, secs = {}, {}
    for draft in (False, True):
        t0 = time.perf_counter()
        crops[draft] = np.stack([decode_image(b, spec, max_pixels=10**8, draft=draft)[0] for b in datas])
        secs[draft] = time.perf_counter() - t0
    info, sd = resolve_weights(ModelConfig(weights=a.weights))
    model = ResNet50Embedder(sd, spec, precision="fp32", threads=2, layout=info.layout)  # v1 for IMAGENET1K_KERAS
    embs, tops = {}, {}
    for draft in (False, True):
        e, logits = zip(*(model.embed(crops[draft][i:i + 32]) for i in range(0, a.images, 32)))
        embs[draft], tops[draft] = torch.cat(e), torch.cat(logits).argmax(1)
    cos = torch.nn.functional.cosine_similarity(embs[False], embs[True]).numpy()
    pix = np.abs(crops[False].astype(np.int16) - crops[True].astype(np.int16))
    print(f"{a.images} photos 500x375..800x600, weights {info.weights_id}")
    print(f"decode full:  {secs[False] / a.images * 1000:6.2f} ms/img ({a.images / secs[False]:6.1f} img/s on one core)")
    print(f"decode draft: {secs[True] / a.images * 1000:6.2f} ms/img ({a.images / secs[True]:6.1f} img/s on one core)")
    print(f"speed-up: {secs[False] / secs[True]:.2f}x")
    print(f"crop pixel |diff|: mean {pix.mean():.2f}, p99 {np.percentile(pix, 99):.0f} (0-255)")
    print(f"embedding cosine(full, draft): mean {cos.mean():.5f}, min {cos.min():.5f}")
    print(f"top-1 label changed: {(tops[False] != tops[True]).float().mean().item():.1%}")


if __name__ == "__main__":
    main()
