"""Retrieval quality of the job's embeddings: near-duplicate variants of the sample photos, real vs random weights.

Each scikit-image photograph the sample data is made from gets variants of six kinds (a crop, a mirrored crop, a
resize down and up, a hard JPEG re-encode, a small rotation, a colour shift), `--per-kind` of each into the input
folder and one of each held out. For each weights setting the real embed job (configs/local.yaml: bf16, reduced-size
JPEG decode) embeds the folder, `resnet-batch index` builds an exact (flat) and an IVF index, and:

- by id (`similar --id`): every indexed variant asks for its k nearest others; relevant = the other variants of its
  photograph. recall@1: the first is relevant; precision@k with k = the variants a photograph has less one.
- by upload (`similar IMAGE`): every held-out variant, embedded as the index's provenance says; recall@1 and
  precision@k with k = a photograph's indexed variants.
- spread: mean cosine between variants of one photograph and between different photographs.

Run: .venv/bin/python benchmarks/retrieval_quality.py [--per-kind 17] [--out /tmp/rq]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KINDS = ("crop", "flip", "resize", "jpeg", "rotate", "colour")


def make_variant(src: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One near duplicate of `src` of the given kind, and the JPEG quality to save it at."""
    w, h = src.size
    quality = 90
    if kind in ("crop", "flip"):
        f = rng.uniform(0.65, 0.9)
        cw, ch = int(w * f), int(h * f)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = src.crop((x, y, x + cw, y + ch))
        if kind == "flip":
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif kind == "resize":
        f = rng.uniform(0.2, 0.4)
        im = src.resize((max(16, int(w * f)), max(16, int(h * f))), Image.Resampling.BILINEAR).resize((w, h))
    elif kind == "jpeg":
        im, quality = src, int(rng.integers(8, 20))
    elif kind == "rotate":
        angle = float(rng.uniform(3, 10)) * (1 if rng.random() < 0.5 else -1)
        im = src.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False)
        im = im.crop((w // 10, h // 10, w - w // 10, h - h // 10))  # no black corners left
    elif kind == "colour":
        im = ImageEnhance.Brightness(src).enhance(rng.uniform(0.7, 1.3))
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.5, 1.5))
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    else:
        raise ValueError(kind)
    return im.convert("RGB"), quality


def write_variants(root: Path, per_kind: int, seed: int = 0) -> tuple[list[str], list[tuple[Path, str]]]:
    """Indexed variants under root/indexed/<photo>/..., held-out ones under root/held-out; returns the photo names
    and (held-out path, photo) pairs."""
    from resnet_batch.dev.sample_data import source_photos

    rng = np.random.default_rng(seed)
    photos = source_photos()
    held = []
    for name, src in sorted(photos.items()):
        for kind in KINDS:
            for i in range(per_kind + 1):
                im, q = make_variant(src, kind, rng)
                if i < per_kind:
                    path = root / "indexed" / name / f"{kind}-{i}.jpg"
                else:
                    path = root / "held-out" / f"{name}--{kind}.jpg"
                    held.append((path, name))
                path.parent.mkdir(parents=True, exist_ok=True)
                im.save(path, format="JPEG", quality=q)
    return sorted(photos), held


def scores(index, held, photo_of, embedder) -> dict:
    """recall@1 and precision@k by id and by upload, for one index."""
    from resnet_batch.search.similar import similar_to_id, similar_to_vector

    ids = index.ids.column("image_id").to_pylist()
    out = {}
    per_photo = {}
    for image_id in ids:
        per_photo.setdefault(photo_of(image_id), []).append(image_id)
    k_id = min(len(v) for v in per_photo.values()) - 1
    r1 = p = 0.0
    for image_id in ids:
        found = similar_to_id(index, image_id, k=k_id)
        rel = [photo_of(m.image_id) == photo_of(image_id) for m in found]
        r1 += rel[0]
        p += sum(rel) / k_id
    out["id"] = (r1 / len(ids), p / len(ids), k_id)
    k_up = k_id + 1
    r1 = p = 0.0
    for path, photo in held:
        found = similar_to_vector(index, embedder.embed_uri(str(path)), k=k_up)
        rel = [photo_of(m.image_id) == photo for m in found]
        r1 += rel[0]
        p += sum(rel) / k_up
    out["upload"] = (r1 / len(held), p / len(held), k_up)
    return out


def spread(emb_uri: str, photo_of) -> tuple[float, float]:
    """Mean cosine within a photograph's variants and between different photographs."""
    import pyarrow.dataset as pads

    t = pads.dataset(emb_uri, format="parquet").to_table(columns=["image_id", "embedding"])
    e = np.array(t.column("embedding").to_pylist(), dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    photos = np.array([photo_of(i) for i in t.column("image_id").to_pylist()])
    s = e @ e.T
    same = photos[:, None] == photos[None, :]
    off = ~np.eye(len(e), dtype=bool)
    return float(s[same & off].mean()), float(s[~same].mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-kind", type=int, default=17,
                    help="indexed variants of each kind per photograph (17: 1,020 in all, enough to train IVF)")
    ap.add_argument("--out", help="work folder (default: a temporary one, removed)")
    ap.add_argument("--weights", nargs="+", default=["IMAGENET1K_KERAS", "random"])
    a = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from resnet_batch.cli import main as cli
    from resnet_batch.config import load_config
    from resnet_batch.embed.runner import run
    from resnet_batch.search.index import SimilarityIndex
    from resnet_batch.search.similar import QueryEmbedder

    work = Path(a.out or tempfile.mkdtemp(prefix="retrieval-quality-"))
    names, held = write_variants(work / "photos", a.per_kind)
    n_indexed = len(list((work / "photos" / "indexed").rglob("*.jpg")))
    print(f"{len(names)} photographs x {len(KINDS)} kinds: {n_indexed} indexed variants, {len(held)} held out "
          f"({', '.join(KINDS)})", flush=True)

    def photo_of(image_id: str) -> str:
        return image_id.split("/", 1)[0]

    rows = []
    for weights in a.weights:
        emb = work / f"emb-{weights}"
        cfg = load_config(REPO / "configs" / "local.yaml", [f"input.uri={work / 'photos' / 'indexed'}",
                                                           f"output.uri={emb}", f"model.weights={weights}"])
        t0 = time.perf_counter()
        report = run(cfg, fresh=True, progress=False)
        assert report["complete"], report
        print(f"{weights}: embedded {report['counts']['ok']} images in {time.perf_counter() - t0:.1f} s", flush=True)
        within, between = spread(str(emb), photo_of)
        for kind in ("flat", "ivf"):
            idx = work / f"index-{weights}-{kind}"
            extra = ["--kind", kind] + (["--tune-queries", str(n_indexed)] if kind == "ivf" else [])
            assert cli(["index", "--embeddings", str(emb), "--out", str(idx), "--rebuild", *extra]) == 0
            index = SimilarityIndex.open(str(idx))
            embedder = QueryEmbedder(index.provenance)
            s = scores(index, held, photo_of, embedder)
            rows.append((weights, kind, s, within, between))
    print()
    print(f"{'weights':<17} {'index':<5} {'by id: recall@1':>15} {'precision@k':>12} {'by upload: recall@1':>19} "
          f"{'precision@k':>12} {'cos same':>9} {'cos other':>9}")
    for weights, kind, s, within, between in rows:
        (ir1, ip, ik), (ur1, up, uk) = s["id"], s["upload"]
        print(f"{weights:<17} {kind:<5} {ir1:>15.3f} {ip:>8.3f} k={ik:<2} {ur1:>19.3f} {up:>8.3f} k={uk:<2} "
              f"{within:>9.3f} {between:>9.3f}")
    if not a.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
