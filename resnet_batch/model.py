"""model module: the ResNet-50 actor; one forward pass gives top-k labels and the 2048-d embedding."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from resnet_batch.decode import PreprocessSpec
from resnet_batch.schema import (DEVICE_NO_CUDA, STATUS_DECODE_ERROR, STATUS_MODEL_ERROR, STATUS_OK,
                                 embedding_array)

_CONSUMED = {"image_id", "path", "width", "height", "status", "error", "pixels", "bytes", "_device_ok"}
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ResNet50Embedder:
    """Holds one ResNet-50 replica; `embed` maps uint8 NHWC crops to (embeddings, logits)."""

    def __init__(self, state_dict: dict, spec: PreprocessSpec, *, precision: str = "fp32",
                 channels_last: bool = True, device: Optional[str] = None, compile: bool = False,
                 threads: Optional[int] = None):
        from torchvision.models import resnet50

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        with torch.device("meta"):  # no random init: the weights are assigned right below
            model = resnet50(weights=None)
        model.load_state_dict(state_dict, strict=True, assign=True)
        self.fc = model.fc.to(self.device).eval()  # kept aside: logits = fc(embedding), in fp32
        model.fc = torch.nn.Identity()
        self.channels_last = channels_last
        model = model.to(self.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.trunk = torch.compile(model) if compile else model
        self.autocast_dtype = _DTYPES[precision]
        self.crop = spec.crop_size
        scale = torch.tensor(255.0)
        self.mean = (torch.tensor(spec.mean) * scale).view(1, 3, 1, 1).to(self.device)
        self.inv_std = (1.0 / (torch.tensor(spec.std) * scale)).view(1, 3, 1, 1).to(self.device)

    def _to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on the host (or already on the device: gpu_decode) -> normalised float NCHW on the
        device (channels_last strides)."""
        x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2)  # a view: NCHW shape, NHWC (channels_last) memory
        if not self.channels_last:
            x = x.contiguous()
        return (x.float() - self.mean) * self.inv_std

    def warmup(self, batch_size: int) -> None:
        """One throw-away forward pass at the working batch size: kernels are chosen and compiled now,
        while the decode tasks fill the queue, not on the first real batch."""
        self.embed(np.zeros((batch_size, self.crop, self.crop, 3), dtype=np.uint8))

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2048) float32 embeddings and (N, 1000) float32 logits from one forward pass."""
        x = self._to_device(pixels)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            emb = self.trunk(x)
        emb = emb.float()
        return emb, self.fc(emb)


class EmbedActor:
    """Ray Data actor: decoded rows in, output rows (labels, probabilities, embedding) out."""

    def __init__(self, state_dict, spec: PreprocessSpec, categories: tuple[str, ...], topk: int,
                 precision: str, channels_last: bool, compile: bool, use_gpu: bool, threads: Optional[int],
                 decode_opts: Optional[dict] = None, warmup_batch: int = 0, require_cuda: bool = False):
        device = _actor_device(use_gpu, require_cuda)
        if not isinstance(state_dict, dict):  # an ObjectRef: the driver put the weights in the object store once
            import ray

            state_dict = ray.get(state_dict)
        self.embedder = ResNet50Embedder(state_dict, spec, precision=precision, channels_last=channels_last,
                                         compile=compile, device=device, threads=threads)
        if warmup_batch and device == "cuda":
            self.embedder.warmup(warmup_batch)
        self.device_name = "cuda" if device == "cuda" else (DEVICE_NO_CUDA if use_gpu else "cpu")
        self.categories = np.array(categories, dtype=object)
        self.topk = topk
        self.spec, self.decode_opts, self._decoder = spec, decode_opts or {}, None  # for JPEG bytes (gpu_decode)
        self.node = _node_name()

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["image_id"])
        status = np.array(batch["status"], dtype=object)
        error = _nulls(batch["error"])
        ok = status == STATUS_OK
        t0 = time.perf_counter()  # the actor's busy time: device decode (gpu_decode) + forward pass
        pixels, device_decode_s = batch.get("pixels"), np.zeros(n, dtype=np.float32)
        if pixels is None and ok.any():  # compute.gpu_decode: JPEG bytes, decoded on this actor's device
            pixels, ok, device_decode_s = self._decode_bytes(batch, status, error, ok)
        elif pixels is not None:
            pixels = pixels[ok]
        emb = np.zeros((n, 2048), dtype=np.float32)
        ids = np.zeros((n, self.topk), dtype=np.int32)
        probs = np.zeros((n, self.topk), dtype=np.float32)
        if ok.any():
            _maybe_fault()
            try:
                e, logits = self.embedder.embed(pixels)
                top = torch.softmax(logits, dim=1).topk(self.topk, dim=1)
                emb[ok] = e.cpu().numpy()
                ids[ok] = top.indices.cpu().numpy()
                probs[ok] = top.values.cpu().numpy()
            except Exception as err:  # e.g. out of memory: these rows are recorded, the job goes on
                status[ok], error[ok] = STATUS_MODEL_ERROR, f"{type(err).__name__}: {err}"
                ok = np.zeros(n, dtype=bool)
        seconds = time.perf_counter() - t0
        k = self.topk
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
        mask = pa.array(~ok)
        width, height = np.asarray(batch["width"]), np.asarray(batch["height"])
        return pa.table({
            **{c: batch[c] for c in ("image_id", "path")},
            "width": pa.array(width, pa.int32(), mask=width < 0),
            "height": pa.array(height, pa.int32(), mask=height < 0),
            "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel()), mask=mask),
            "topk_labels": pa.ListArray.from_arrays(offsets, pa.array(self.categories[ids.ravel()], pa.string()), mask=mask),
            "topk_probs": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel()), mask=mask),
            "embedding": embedding_array(emb, ok),
            "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string()),
            **{c: _nulls(batch[c]) for c in batch if c not in _CONSUMED},  # internal (_*) and pass-through
            "_model_s": np.full(n, seconds / max(n, 1), dtype=np.float32),
            "_device_decode_s": device_decode_s,  # the part of _model_s spent decoding (gpu_decode)
            "_node": np.full(n, self.node, dtype=object),
            "_worker": np.full(n, f"{self.node}:{os.getpid()}", dtype=object),
            "_device": np.full(n, self.device_name, dtype=object),
        })

    def _decode_bytes(self, batch: dict, status: np.ndarray, error: np.ndarray, ok: np.ndarray):
        """The `ok` rows' bytes -> (crops on the device, new ok mask, seconds per row); failures become
        decode_error rows."""
        if self._decoder is None:
            from resnet_batch.gpu_decode import DeviceJpegDecoder

            self._decoder = DeviceJpegDecoder(self.spec, self.embedder.device, **self.decode_opts)
        out = self._decoder.decode(batch["bytes"], batch["_device_ok"], todo=ok)
        failed = ok & ~out.ok
        status[failed] = STATUS_DECODE_ERROR
        error[failed] = np.array(out.error, dtype=object)[failed]
        for dim in ("width", "height"):  # unknown for a failed image, as on the CPU path
            batch[dim] = np.where(failed, -1, batch[dim])
        return out.pixels, out.ok, out.seconds


def _actor_device(use_gpu: bool, require_cuda: bool) -> str:
    """"cuda" when Ray gave this actor a GPU and torch can use it; otherwise "cpu", or an error if required."""
    if not use_gpu:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    message = (f"this model actor was given a GPU by Ray (CUDA_VISIBLE_DEVICES={visible}) on node {_node_name()}, "
               f"but torch {torch.__version__} sees no CUDA device (a CPU-only torch build, or no NVIDIA driver)")
    if require_cuda:
        raise RuntimeError(f"compute.device=cuda: {message}")
    logging.getLogger(__name__).warning("%s; running on the CPU", message)
    return "cpu"


def _node_name() -> str:
    """The Ray node id inside Ray; the host name outside it (never starts a Ray runtime)."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def _nulls(values: np.ndarray) -> np.ndarray:
    """Ray's numpy batches carry missing strings as NaN; give Arrow None instead."""
    values = np.asarray(values)
    if values.dtype != object:
        return values
    return np.array([None if isinstance(v, float) and v != v else v for v in values], dtype=object)


def _maybe_fault() -> None:
    """Test-only fault hook: RESNET_BATCH_FAULT_KILL_ACTOR=<file> kills this actor once (the file is the latch)."""
    latch = os.environ.get("RESNET_BATCH_FAULT_KILL_ACTOR")
    if latch and not os.path.exists(latch):
        with open(latch, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)

