"""library module: a photo library that changes between nights: new photos, and what is in it now."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from resnet_batch.dev.sample_data import jpeg_bytes, source_photos, variant


def current_photos(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}


def new_photo(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    photos = list(source_photos().values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(variant(photos[seed % len(photos)], rng), 90))
