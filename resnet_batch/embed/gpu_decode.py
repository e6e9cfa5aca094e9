"""gpu_decode module: JPEG bytes -> uint8 crops on the model's device (nvJPEG batches), CPU decode as the fallback.

With `compute.gpu_decode` on a GPU cluster the read tasks only *probe* each image (`probe_table`:
the header gives width/height, size limits and whether nvJPEG can take it) and pass the bytes on;
the model actor decodes a whole batch with `torchvision.io.decode_jpeg(..., device="cuda")`, then
resizes (bilinear, antialiased; images of one size together) and centre-crops on the device
following the weights' transforms (`PreprocessSpec`). Other formats, EXIF-rotated or CMYK JPEGs,
any image nvJPEG rejects, and any image whose device resize fails (out of memory, a kernel error) are
decoded per image on the CPU by `decode.decode_image`, so every row ends `ok` or `decode_error` exactly
as on the CPU path. Everything here also runs with device="cpu" (the tests do that).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from resnet_batch.decode import (DEFAULT_FORMATS, DecodeError, PreprocessSpec, crop_offsets, decode_image, each_image,
                                 open_image, resized_size, with_outcome)

_DEVICE_MODES = ("RGB", "L")  # JPEG colour spaces nvJPEG turns into RGB the way Pillow does
_JPEG_EOI = b"\xff\xd9"
_CHUNK_PIXELS = 64 << 20  # source pixels resized at once (768 MB as float32 RGB)


def probe_image(data: bytes, max_pixels: int, formats: Sequence[str] = DEFAULT_FORMATS) -> tuple[int, int, bool]:
    """Read only the header: (width, height as displayed, whether the device decoder can take it).

    Raises DecodeError for what the CPU path would refuse before decoding pixels (empty, not an
    image, over max_pixels); a truncated or corrupt body is found later, when decoding.
    """
    with open_image(data, max_pixels, formats) as (im, width, height, orientation):
        device_ok = (im.format == "JPEG" and im.mode in _DEVICE_MODES and orientation in (None, 1)
                     and data[-64:].rstrip(b"\0")[-2:] == _JPEG_EOI)  # truncated: Pillow decides
        return width, height, device_ok


def probe_table(table: pa.Table, max_pixels: int, formats: Sequence[str] = DEFAULT_FORMATS) -> pa.Table:
    """The read task's stage in gpu_decode mode: like decode.decode_table, but `bytes` stay and no pixels.

    Adds the decode outcome (decode.with_outcome; _decode_s is the probe time) and `_device_ok` per row.
    """
    n = len(table)
    widths, heights = np.full(n, -1, dtype=np.int32), np.full(n, -1, dtype=np.int32)
    device_ok = np.zeros(n, dtype=bool)

    def probe(i: int, data: bytes) -> None:
        widths[i], heights[i], device_ok[i] = probe_image(data, max_pixels, formats)

    status, error, seconds = each_image(table, probe)
    return with_outcome(table, status, error, widths, heights, seconds).append_column("_device_ok", pa.array(device_ok))


@dataclass
class DecodedBatch:
    """Crops for the rows that decoded, in row order, plus per-row outcome."""

    pixels: torch.Tensor  # (number of ok rows, C, C, 3) uint8 on the device, NHWC like the CPU path
    ok: np.ndarray  # bool per input row
    error: list  # message per input row (None where ok)
    seconds: np.ndarray  # decode + resize time per input row (a batch's device time is shared out)
    on_device: int  # rows decoded by the device decoder (the rest of `ok` went through the CPU)


class DeviceJpegDecoder:
    """Decodes batches of image bytes to centre crops on `device`; one per model actor."""

    def __init__(self, spec: PreprocessSpec, device: str | torch.device, *, max_pixels: int = 100_000_000,
                 draft: bool = True, formats: Sequence[str] = DEFAULT_FORMATS):
        self.spec, self.device = spec, torch.device(device)
        self.max_pixels, self.draft, self.formats = max_pixels, draft, tuple(formats)

    def decode(self, data: Sequence[bytes], device_ok: Sequence[bool],
               todo: Optional[np.ndarray] = None) -> DecodedBatch:
        """Decode rows where `todo` (default: all); `device_ok` rows go to nvJPEG as one batch."""
        n = len(data)
        todo = np.ones(n, dtype=bool) if todo is None else np.asarray(todo, dtype=bool)
        crops: list[Optional[torch.Tensor]] = [None] * n
        error: list[Optional[str]] = [None] * n
        seconds = np.zeros(n, dtype=np.float32)
        on_device = [i for i in range(n) if todo[i] and device_ok[i]]
        t0 = time.perf_counter()
        for i, crop in zip(on_device, self._device_crops([data[i] for i in on_device])):
            crops[i] = crop
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if on_device:
            seconds[on_device] = (time.perf_counter() - t0) / len(on_device)
        device_done = sum(crops[i] is not None for i in on_device)
        for i in range(n):
            if todo[i] and crops[i] is None:  # not a plain JPEG, or the device decoder refused it
                t1 = time.perf_counter()
                try:
                    hwc, _, _ = decode_image(data[i], self.spec, max_pixels=self.max_pixels, draft=self.draft,
                                             formats=self.formats)
                    crops[i] = torch.from_numpy(np.array(hwc)).to(self.device)  # Pillow arrays are read-only
                except DecodeError as err:
                    error[i] = str(err)
                except Exception as err:  # a decoder bug must not fail the batch
                    error[i] = f"unexpected {type(err).__name__}: {err}"
                seconds[i] += time.perf_counter() - t1
        ok = np.array([c is not None for c in crops], dtype=bool)
        c = self.spec.crop_size
        pixels = torch.stack([x for x in crops if x is not None]) if ok.any() else \
            torch.zeros((0, c, c, 3), dtype=torch.uint8, device=self.device)
        return DecodedBatch(pixels, ok, error, seconds, device_done)

    def _device_crops(self, data: list[bytes]) -> list[Optional[torch.Tensor]]:
        """One batched device decode; if the batch fails, image by image; None where an image fails."""
        if not data:
            return []
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.from_numpy(np.frombuffer(d, dtype=np.uint8).copy()) for d in data]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            try:
                images: list = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except Exception:  # one bad image fails the whole batch: find it
                images = []
                for e in encoded:
                    try:
                        images.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=self.device))
                    except Exception:  # this one goes to the CPU decoder, which says what is wrong
                        images.append(None)
        return self.resize_crop_many(images)

    def resize_crop_many(self, images: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """resize_crop for a batch: images of one size (a camera's photos, a resized dataset) are resized
        together, in chunks of at most _CHUNK_PIXELS source pixels, instead of one kernel launch each.
        A chunk whose resize fails on the device (out of memory...) is left None: the CPU path decodes it."""
        by_shape: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            if im is not None:
                by_shape.setdefault(tuple(im.shape), []).append(i)
        crops: list[Optional[torch.Tensor]] = [None] * len(images)
        for (_, h, w), rows in by_shape.items():
            step = max(1, _CHUNK_PIXELS // (h * w))
            for k in range(0, len(rows), step):
                chunk = rows[k:k + step]
                try:
                    out = self._resize_crop_batch(torch.stack([images[i] for i in chunk]))
                except Exception:  # out of device memory, a kernel error: these images go to the CPU path
                    out = None
                if out is not None:  # else too small: None, decoded (and refused) by the CPU path
                    for i, crop in zip(chunk, out):
                        crops[i] = crop
        return crops

    def resize_crop(self, chw: torch.Tensor) -> Optional[torch.Tensor]:
        """(3, H, W) uint8 -> (C, C, 3) uint8: Resize(short side, bilinear, antialias) then CenterCrop."""
        out = self._resize_crop_batch(chw.unsqueeze(0))
        return None if out is None else out[0]

    def _resize_crop_batch(self, nchw: torch.Tensor) -> Optional[torch.Tensor]:
        """(N, 3, H, W) uint8 of one size -> (N, C, C, 3) uint8; None if the image is smaller than the crop
        after resizing (the CPU path then raises the proper error)."""
        spec = self.spec
        h, w = nchw.shape[-2:]
        new_w, new_h = resized_size(w, h, spec.resize_size)
        c = spec.crop_size
        if new_w < c or new_h < c:
            return None
        x = torch.nn.functional.interpolate(nchw.float(), size=(new_h, new_w), mode="bilinear",
                                            align_corners=False, antialias=True)
        left, top = crop_offsets(new_w, new_h, c)
        x = x[:, :, top:top + c, left:left + c]
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
