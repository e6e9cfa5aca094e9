"""A catalogue of bad and awkward inputs, made from real photographs, with what each must become."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_batch.dev.sample_data import source_photos


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG whose header claims width x height pixels (3.6 G pixels) in a few dozen bytes on disk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def exif_rotated_jpeg(photo: Image.Image) -> bytes:
    """A landscape JPEG stored with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(photo, "JPEG", quality=90, exif=exif.tobytes())


def catalogue() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, expected status: 'ok' or 'decode_error')."""
    photos = source_photos()
    coffee = photos["coffee"].resize((400, 300))
    chelsea = photos["chelsea"].resize((360, 240))
    good_jpeg = _save(coffee, "JPEG", quality=90)
    gif_frames = [chelsea.convert("P"), coffee.resize((360, 240)).convert("P")]
    gif = io.BytesIO()
    gif_frames[0].save(gif, format="GIF", save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    gray16 = Image.fromarray(np.asarray(coffee.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    rgba = coffee.convert("RGBA")
    rgba.putalpha(128)
    return {
        "good.jpg": (good_jpeg, "ok"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "decode_error"),
        "zero.jpg": (b"", "decode_error"),
        "text.jpg": (b"this is a text file, not a photo\n" * 20, "decode_error"),
        "random.png": (np.random.default_rng(0).bytes(5000), "decode_error"),
        "bomb.png": (png_bomb(), "decode_error"),
        "cmyk.jpg": (_save(coffee.convert("CMYK"), "JPEG", quality=90), "ok"),
        "gray16.png": (_save(gray16, "PNG"), "ok"),
        "palette.png": (_save(coffee.convert("P"), "PNG"), "ok"),
        "rgba.png": (_save(rgba, "PNG"), "ok"),
        "gray.png": (_save(coffee.convert("L"), "PNG"), "ok"),
        "exif-rotated.jpg": (exif_rotated_jpeg(coffee), "ok"),
        "tiny-1x1.png": (_save(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"), "ok"),
        "panorama-4000x50.jpg": (_save(coffee.resize((4000, 50)), "JPEG", quality=85), "ok"),
        "animated.gif": (gif.getvalue(), "ok"),
        "photo.webp": (_save(chelsea, "WEBP", quality=80), "ok"),
        "UPPER.JPEG": (_save(chelsea, "JPEG", quality=85), "ok"),
        "name with spaces é ü 写真.jpg": (_save(chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG"), "ok"),
    }


NON_IMAGES = {"notes.txt": b"not an image\n", "labels.csv": b"a,b\n1,2\n", "sub/README": b"readme\n"}


def write_catalogue(root: Path) -> dict[str, str]:
    """Write the catalogue (under root/mixed/) and some non-image files; returns image_id -> expected status."""
    expected = {}
    for name, (data, status) in catalogue().items():
        path = root / "mixed" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[f"mixed/{name}"] = status
    for name, data in NON_IMAGES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return expected
