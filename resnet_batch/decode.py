"""decode module: image bytes -> RGB uint8 crop, the weights' own resize / centre-crop, EXIF applied."""
from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from resnet_batch.config import DEFAULT_EXTENSIONS
from resnet_batch.schema import STATUS_DECODE_ERROR, STATUS_OK

# Orientations 5-8 swap width and height when applied.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


class DecodeError(Exception):
    """The bytes are not a usable image; the message says why."""


def pillow_formats(extensions: Iterable[str]) -> tuple[str, ...]:
    """The Pillow formats that may open files with these extensions (jpg/jpeg -> JPEG, tif -> TIFF, ico -> ICO, ...,
    as Pillow registers them), in order, each once; an extension no Pillow plugin claims gives none."""
    registered = Image.registered_extensions()
    found = (registered.get("." + e.lower().lstrip(".")) for e in extensions)
    return tuple(dict.fromkeys(f for f in found if f))


# What decoding allows when the caller does not say: the formats of the default input.extensions.
DEFAULT_FORMATS = pillow_formats(DEFAULT_EXTENSIONS)


def sniff_format(data: bytes) -> str | None:
    """The Pillow format whose signature check accepts these bytes, without opening them with any decoder."""
    prefix = data[:16]  # what Image.open hands the plugins' checks
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if accept is not None and accept(prefix):
            return fmt
    return None


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize / crop / normalisation: a torchvision weights' transforms() (bilinear), from torchvision_meta's table."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_weights(cls, weights_name: str) -> "PreprocessSpec":
        from resnet_batch.torchvision_meta import IMAGENET_MEAN, IMAGENET_STD, RESNET50_WEIGHTS

        w = RESNET50_WEIGHTS[weights_name]
        return cls(w.resize_size, w.crop_size, IMAGENET_MEAN, IMAGENET_STD)

    def as_dict(self) -> dict:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation, "antialias": True}


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """torchvision's Resize(int) output size: the short side becomes `short_side`, aspect kept (floored)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def crop_offsets(width: int, height: int, crop: int) -> tuple[int, int]:
    """torchvision's CenterCrop: (left, top) of the crop x crop square in a width x height image."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


@contextlib.contextmanager
def open_image(data: bytes, max_pixels: int,
               formats: Sequence[str] = DEFAULT_FORMATS) -> Iterator[tuple[Image.Image, int, int, int]]:
    """Open image bytes lazily (header only) and check them: yields (image, width, height, EXIF orientation).

    Only the Pillow `formats` given are tried (see pillow_formats): a .jpg that is really EPS, PSD or ICNS
    never reaches that decoder. width/height are as displayed (after orientation). Every failure, here or in
    the caller's block, becomes a DecodeError with a human-readable reason.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(formats)) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise DecodeError(
                        f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                        "(input.max_pixels); refused as a possible decompression bomb")
                orientation = im.getexif().get(0x0112, 1)
                if orientation in _TRANSPOSING_ORIENTATIONS:
                    width, height = height, width
                yield im, width, height, orientation
    except DecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise DecodeError(f"decompression bomb refused: {err}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError(_unidentified(data, formats)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise DecodeError(f"corrupt image: {err}") from None


def _unidentified(data: bytes, formats: Sequence[str]) -> str:
    """Why no allowed decoder took the bytes: another format's data (by its signature), a broken header, or not
    an image at all."""
    found = sniff_format(data)
    if found is None:
        return "not an image (format not recognised)"
    if found in formats:
        return f"corrupt image: not a readable {found} header"
    return (f"not a {'/'.join(formats) or 'allowed'} image: it looks like {found}, a format input.extensions "
            "does not allow (not decoded)")


def decode_image(data: bytes, spec: PreprocessSpec, *, max_pixels: int, draft: bool,
                 formats: Sequence[str] = DEFAULT_FORMATS) -> tuple[np.ndarray, int, int]:
    """Decode, orient, convert to RGB, resize and centre-crop one image (opened only as one of `formats`).

    Returns (HWC uint8 crop, width, height) where width/height are the original size as displayed
    (after EXIF orientation). Raises DecodeError with a human-readable reason.
    """
    with open_image(data, max_pixels, formats) as (im, width, height, _):
        return _crop(im, spec, draft), width, height


def _crop(im: Image.Image, spec: PreprocessSpec, draft: bool) -> np.ndarray:
    if draft and im.format == "JPEG":
        # Reduced-size DCT decode: the result stays at least as large as what Resize needs.
        scale = spec.resize_size / min(im.size)
        if scale < 1:
            im.draft("RGB", (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))
    im = ImageOps.exif_transpose(im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    new_w, new_h = resized_size(im.size[0], im.size[1], spec.resize_size)
    im = im.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    c = spec.crop_size
    if new_w < c or new_h < c:
        raise DecodeError(f"resized image {new_w}x{new_h} is smaller than the {c}px crop")
    left, top = crop_offsets(new_w, new_h, c)
    return np.asarray(im.crop((left, top, left + c, top + c)), dtype=np.uint8)


def decode_table(table: pa.Table, spec: PreprocessSpec, max_pixels: int, draft: bool,
                 formats: Sequence[str] = DEFAULT_FORMATS) -> pa.Table:
    """The read task's decode stage: rows with `bytes` -> rows with a `pixels` column (each ok row's uint8
    C x C x 3 crop as bytes; a row that failed carries none, so broken files cost nothing in flight) and
    the decode outcome (see with_outcome). `formats`: the Pillow formats allowed (pillow_formats(extensions))."""
    n = len(table)
    crops: list[bytes] = [b""] * n
    widths, heights = np.full(n, -1, dtype=np.int32), np.full(n, -1, dtype=np.int32)

    def decode(i: int, data: bytes) -> None:
        crop, widths[i], heights[i] = decode_image(data, spec, max_pixels=max_pixels, draft=draft, formats=formats)
        crops[i] = crop.tobytes()

    status, error, seconds = each_image(table, decode)
    out = with_outcome(table.drop_columns(["bytes"]), status, error, widths, heights, seconds)
    return out.append_column("pixels", pa.array(crops, pa.binary()))


def crops_of(column: pa.ChunkedArray | pa.Array, ok: np.ndarray, crop: int) -> np.ndarray:
    """(number of ok rows, crop, crop, 3) uint8 from a `pixels` column (decode_table's), without copying:
    the rows that failed hold no bytes, so the ok rows' crops lie back to back in one buffer."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
    size = crop * crop * 3
    lengths = np.diff(offsets)
    if not (lengths[ok] == size).all() or lengths[~ok].any():
        raise ValueError("pixels column does not match the rows' decode status")
    values = arr.buffers()[2]
    count = int(ok.sum())
    if count == 0:
        return np.zeros((0, crop, crop, 3), dtype=np.uint8)
    return np.frombuffer(values, dtype=np.uint8, count=count * size, offset=int(offsets[0])).reshape(
        count, crop, crop, 3)


def each_image(table: pa.Table, fn: Callable[[int, bytes], None]) -> tuple[list, list, np.ndarray]:
    """Run fn(row, bytes) for every row still `ok`; a failure makes the row a decode_error with its reason.

    Returns (status, error, seconds) per row; rows that arrived failed (a read error) are left as they are.
    """
    status, error = table.column("status").to_pylist(), table.column("error").to_pylist()
    seconds = np.zeros(len(table), dtype=np.float32)
    for i, data in enumerate(table.column("bytes").to_pylist()):
        if status[i] != STATUS_OK:
            continue
        t0 = time.perf_counter()
        try:
            fn(i, data)
        except DecodeError as err:
            status[i], error[i] = STATUS_DECODE_ERROR, str(err)
        except Exception as err:  # a decoder bug must not fail the block
            status[i], error[i] = STATUS_DECODE_ERROR, f"unexpected {type(err).__name__}: {err}"
        seconds[i] = time.perf_counter() - t0
    return status, error, seconds


def with_outcome(table: pa.Table, status: list, error: list, widths: np.ndarray, heights: np.ndarray,
                 seconds: np.ndarray) -> pa.Table:
    """The table with each row's decode outcome: status, error, width/height as displayed (-1: unknown), _decode_s."""
    return table.drop_columns(["status", "error"]).append_column("status", pa.array(status, pa.string())) \
        .append_column("error", pa.array(error, pa.string())) \
        .append_column("width", pa.array(widths)).append_column("height", pa.array(heights)) \
        .append_column("_decode_s", pa.array(seconds))
