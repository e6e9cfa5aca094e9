"""Near-duplicate quality: recall@1 and precision@10 of same-source neighbours, product vs plain torchvision.

    .venv/bin/python benchmarks/neighbors_quality.py [--per-source 11] [--seed 0] [--weights-seed 0]

Builds a set of several random crops / mirror flips (sample_data.variant, JPEG q70-95) and lower-quality,
smaller re-encodes of each of 22 photographs that scikit-image ships, then:
- product: the real embed job (configs/local.yaml: seeded random weights, bf16, reduced-size JPEG decode;
  and again in fp32 with full JPEG decode) -> `resnet-batch index` -> the neighbours Ray job (k=10, the
  image itself excluded);
- reference: a plain torchvision ResNet-50 with the same seeded random weights, the weights' own
  transforms() on fully decoded PIL images, fp32, pooled 2048-d features, brute-force cosine in numpy.
recall@1: the nearest other image comes from the same photograph. precision@10: the share of the 10 nearest
other images that do (each photograph has per-source - 1 >= 10 other images in the set).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_batch.dev.sample_data import jpeg_bytes, source_photos, variant  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# More photographs bundled with scikit-image (grey ones are converted to RGB). Left out: motorcycle_right
# (the stereo twin of motorcycle_left), the synthetic chessboards, and the 102 px microaneurysms.
EXTRA_SOURCES = ("brick.png", "camera.png", "cell.png", "clock_motion.png", "coins.png", "grass.png", "gravel.png",
                 "horse.png", "moon.png", "page.png", "phantom.png", "text.png")


def sources() -> dict[str, Image.Image]:
    import skimage

    photos = dict(source_photos())
    for name in EXTRA_SOURCES:
        with Image.open(Path(skimage.__file__).parent / "data" / name) as im:
            photos[Path(name).stem] = im.convert("RGB")
    return photos


def make_set(out: Path, per_source: int, seed: int) -> dict[str, str]:
    """Write the set (3 of each source's images are re-encodes of its crops); returns file name -> source."""
    rng = np.random.default_rng(seed)
    labels = {}
    reencodes = 3
    for name, src in sorted(sources().items()):
        crops = [variant(src, rng) for _ in range(per_source - reencodes)]
        for i, im in enumerate(crops):
            labels[f"{name}-c{i:02d}.jpg"] = name
            (out / f"{name}-c{i:02d}.jpg").write_bytes(jpeg_bytes(im, int(rng.integers(70, 96))))
        for j in range(reencodes):
            im = crops[j]
            scale = rng.uniform(0.6, 0.85)
            small = im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.BILINEAR)
            labels[f"{name}-r{j:02d}.jpg"] = name
            (out / f"{name}-r{j:02d}.jpg").write_bytes(jpeg_bytes(small, int(rng.integers(35, 61))))
    return labels


def scores(neighbours: dict[str, list[str]], source: dict[str, str], k: int = 10) -> tuple[float, float, list]:
    """(recall@1, precision@k, the images whose nearest other image is from another photograph)."""
    misses = sorted(f"{q}->{n[0]}" for q, n in neighbours.items() if source[n[0]] != source[q])
    pk = np.mean([np.mean([source[x] == source[q] for x in n[:k]]) for q, n in neighbours.items()])
    return 1 - len(misses) / len(neighbours), float(pk), misses


def cos_gap(emb: np.ndarray, names: list[str], source: dict[str, str]) -> tuple[float, float]:
    """Mean cosine between images of the same source, and between images of different sources."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = x @ x.T
    src = np.array([source[n] for n in names])
    same = src[:, None] == src[None]
    off = ~np.eye(len(names), dtype=bool)
    return float(sims[same & off].mean()), float(sims[~same].mean())


def run_product(data: Path, work: Path, precision: str, draft: bool, weights_seed: int,
                source: dict[str, str]) -> dict:
    """Embed job -> index -> neighbours job, exactly as a user runs them."""
    import pyarrow.parquet as pq

    from resnet_batch.config import load_config
    from resnet_batch.search.build import build_index
    from resnet_batch.search.neighbors import NeighborsConfig, read_neighbors, run_neighbors
    from resnet_batch.embed.runner import run
    from resnet_batch.schema import embeddings_to_numpy

    tag = f"{precision}-{'draft' if draft else 'full'}"
    out, idx, nb = work / f"emb-{tag}", work / f"idx-{tag}", work / f"nb-{tag}"
    cfg = load_config(REPO / "configs" / "local.yaml", [f"input.uri={data}", f"output.uri={out}",
                                                         f"model.seed={weights_seed}", f"model.precision={precision}",
                                                         f"input.jpeg_draft={str(draft).lower()}"])
    t0 = time.perf_counter()
    report = run(cfg, fresh=True, progress=False)
    embed_s = time.perf_counter() - t0
    assert report["complete"], report
    build_index([str(out)], str(idx), log=lambda m: None)
    run_neighbors(NeighborsConfig(index=str(idx), out=str(nb), k=10, threshold=0.9999), progress=False)
    table = read_neighbors(str(nb))
    name = {r: r.rsplit("/", 1)[-1] for r in table.column("image_id").to_pylist()}
    neighbours = {name[r["image_id"]]: [name.get(x, x.rsplit("/", 1)[-1]) for x in r["neighbor_ids"]]
                  for r in table.to_pylist()}
    emb_table = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["image_id", "embedding"])
    names = [i.rsplit("/", 1)[-1] for i in emb_table.column("image_id").to_pylist()]
    gap = cos_gap(embeddings_to_numpy(emb_table.column("embedding")).copy(), names, source)
    return {"scores": scores(neighbours, source), "gap": gap, "embed_s": embed_s, "n": len(neighbours)}


def run_reference(data: Path, names: list[str], weights_seed: int, source: dict[str, str]) -> dict:
    """Plain torchvision ResNet-50 + the weights' transforms() + numpy cosine."""
    import torch
    from torchvision.models import ResNet50_Weights, resnet50

    from resnet_batch.weights import random_state_dict

    model = resnet50(weights=None)
    model.load_state_dict(random_state_dict(weights_seed))
    model.fc = torch.nn.Identity()
    model.eval()
    tf = ResNet50_Weights.IMAGENET1K_V2.transforms()
    t0 = time.perf_counter()
    feats = []
    with torch.inference_mode():
        for s in range(0, len(names), 16):
            batch = []
            for n in names[s:s + 16]:
                with Image.open(io.BytesIO((data / n).read_bytes())) as im:
                    batch.append(tf(im.convert("RGB")))
            feats.append(model(torch.stack(batch)).numpy())
    emb = np.concatenate(feats)
    embed_s = time.perf_counter() - t0
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :10]
    neighbours = {n: [names[j] for j in row] for n, row in zip(names, order)}
    return {"scores": scores(neighbours, source), "gap": cos_gap(emb, names, source), "embed_s": embed_s,
            "n": len(names)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-source", type=int, default=11, help="images per photograph (>= 11 for precision@10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated set")
    ap.add_argument("--weights-seed", type=int, default=0, help="seed of the random ResNet-50 weights")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="nbq-") as tmp:
        data, work = Path(tmp) / "photos", Path(tmp) / "work"
        data.mkdir()
        source = make_set(data, args.per_source, args.seed)
        names = sorted(source)
        n_src = len(set(source.values()))
        print(f"set: {n_src} photographs x {args.per_source} images = {len(names)} "
              f"({args.per_source - 3} crops/flips + 3 smaller low-quality re-encodes each); "
              f"weights: seeded random (seed={args.weights_seed})")
        reference = "plain torchvision ResNet-50 (fp32, transforms(), numpy)"
        results = {
            "product, configs/local.yaml (bf16, reduced-size JPEG decode)": run_product(
                data, work, "bf16", True, args.weights_seed, source),
            "product, fp32, full JPEG decode": run_product(data, work, "fp32", False, args.weights_seed, source),
            reference: run_reference(data, names, args.weights_seed, source),
        }
    print(f"\n{'pipeline':<62} {'images':>6} {'recall@1':>9} {'prec@10':>8} {'cos same':>9} {'cos other':>9} "
          f"{'embed s':>8}")
    for name, r in results.items():
        print(f"{name:<62} {r['n']:6d} {r['scores'][0]:9.3f} {r['scores'][1]:8.3f} {r['gap'][0]:9.5f} "
              f"{r['gap'][1]:9.5f} {r['embed_s']:8.1f}")
    print("\nnearest other image from another photograph (query->neighbour):")
    for name, r in results.items():
        print(f"  {name}: {', '.join(r['scores'][2]) or 'none'}")
    ref = results[reference]["scores"]
    product = results["product, configs/local.yaml (bf16, reduced-size JPEG decode)"]["scores"]
    worse = product[0] < ref[0] or product[1] < ref[1] - 0.01
    print(f"\nproduct (default config) vs reference: recall@1 {product[0] - ref[0]:+.3f}, "
          f"precision@10 {product[1] - ref[1]:+.3f}: {'WORSE' if worse else 'not worse'}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
