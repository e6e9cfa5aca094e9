"""sample_data module: realistic JPEG photos in shard folders (from the photographs scikit-image ships),
and img2dataset-style WebDataset tars / Parquet shards made from them."""
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


# -- img2dataset-style shards (WebDataset tars, Parquet) made from photos ---------------------------
IMG2DATASET_META = ("url", "caption", "key", "status", "error_message", "width", "height",
                    "original_width", "original_height", "exif", "sha256")


def _sample_meta(photo: Path, root: Path, key: str, data: bytes) -> dict:
    """The metadata img2dataset records for one downloaded image (its `KEY.json` / Parquet row)."""
    import hashlib

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
    rel = photo.relative_to(root).as_posix()
    return {"url": f"https://photos.example.com/{rel}", "caption": f"a photo of {photo.stem.rsplit('-', 1)[0]}",
            "key": key, "status": "success", "error_message": None, "width": width, "height": height,
            "original_width": width, "original_height": height, "exif": None,
            "sha256": hashlib.sha256(data).hexdigest()}


def _chunks(photos: list[Path], per_shard: int) -> list[list[Path]]:
    return [photos[i:i + per_shard] for i in range(0, len(photos), per_shard)]


def _write_stats(out: Path, shard: int, count: int, failed: int = 0) -> None:
    """img2dataset's per-shard `NNNNN_stats.json` (not an input shard; listed and skipped)."""
    import json

    stats = {"count": count + failed, "successes": count, "failed_to_download": failed,
             "failed_to_resize": 0, "status_dict": {"success": count}}
    (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats))


def write_webdataset(photos: list[Path], root: str | os.PathLike, out_dir: str | os.PathLike, *,
                     per_shard: int = 10_000) -> list[Path]:
    """Write photos as img2dataset writes WebDataset output: out_dir/NNNNN.tar holding KEY.jpg, KEY.json and
    KEY.txt (the caption) per sample, KEY = 5-digit shard + 4-digit index, and beside each tar its
    metadata NNNNN.parquet and NNNNN_stats.json. `root` is what the photos' urls are relative to."""
    import json
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    root, out = Path(root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tars = []
    for shard, group in enumerate(_chunks(sorted(photos), per_shard)):
        path = out / f"{shard:05d}.tar"
        metas = []
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, photo in enumerate(group):
                key = f"{shard:05d}{i:04d}"
                data = photo.read_bytes()
                meta = _sample_meta(photo, root, key, data)
                metas.append(meta)
                members = {"jpg": data, "json": json.dumps(meta).encode(), "txt": meta["caption"].encode()}
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        pq.write_table(pa.Table.from_pylist(metas), out / f"{shard:05d}.parquet")
        _write_stats(out, shard, len(group))
        tars.append(path)
    return tars


def write_image_parquet(photos: list[Path], root: str | os.PathLike, out_dir: str | os.PathLike, *,
                        per_shard: int = 10_000, failed_per_shard: int = 0, image_column: str = "jpg") -> list[Path]:
    """Write photos as img2dataset's Parquet output: out_dir/NNNNN.parquet with the metadata columns
    (url, caption, key, status, ..., sha256) and the JPEG bytes in `image_column`, plus NNNNN_stats.json.
    `failed_per_shard` adds rows like img2dataset's failed downloads: status failed_to_download, no image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, out = Path(root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for shard, group in enumerate(_chunks(sorted(photos), per_shard)):
        rows = []
        for i, photo in enumerate(group):
            data = photo.read_bytes()
            rows.append({**_sample_meta(photo, root, f"{shard:05d}{i:04d}", data), image_column: data})
        for j in range(failed_per_shard):
            key = f"{shard:05d}{len(group) + j:04d}"
            rows.append({"url": f"https://photos.example.com/missing-{key}.jpg", "caption": "a lost photo",
                         "key": key, "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found",
                         "width": None, "height": None, "original_width": None, "original_height": None,
                         "exif": None, "sha256": None, image_column: None})
        schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                            ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                            ("height", pa.int64()), ("original_width", pa.int64()), ("original_height", pa.int64()),
                            ("exif", pa.string()), ("sha256", pa.string()), (image_column, pa.binary())])
        path = out / f"{shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        _write_stats(out, shard, len(group), failed_per_shard)
        files.append(path)
    return files
