"""sample_data module: realistic JPEG photos in shard folders, derived from the photographs scikit-image ships."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs bundled inside the scikit-image wheel (no download needed).
SOURCE_FILES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "logo.png", "color.png")


def source_photos() -> dict[str, Image.Image]:
    """name -> RGB PIL image, read straight from skimage/data/."""
    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    photos = {}
    for name in SOURCE_FILES:
        path = data_dir / name
        if path.exists():
            with Image.open(path) as im:
                photos[path.stem] = im.convert("RGB")
    if not photos:
        raise RuntimeError(f"no sample photographs found in {data_dir}")
    return photos


def variant(src: Image.Image, rng: np.random.Generator, size: tuple[int, int] | None = None) -> Image.Image:
    """A random crop (50-100% of each side), maybe mirrored, resized to 500x375..800x600 (either orientation)."""
    w, h = src.size
    cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = src.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if size is None:
        long_side = int(rng.integers(500, 801))
        short_side = long_side * 3 // 4
        size = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    return im.resize(size, Image.Resampling.BICUBIC)


def jpeg_bytes(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_sample_photos(out_dir: str | os.PathLike, n: int, *, per_folder: int = 100, seed: int = 0) -> list[Path]:
    """Write n JPEGs as out_dir/shard-XXX/<source>-XXXXX.jpg; returns their paths. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    names = sorted(photos)
    out = Path(out_dir)
    paths = []
    for i in range(n):
        name = names[i % len(names)]
        folder = out / f"shard-{i // per_folder:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}-{i:05d}.jpg"
        path.write_bytes(jpeg_bytes(variant(photos[name], rng), quality=int(rng.integers(70, 96))))
        paths.append(path)
    return paths
