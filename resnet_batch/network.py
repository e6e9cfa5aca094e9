"""network module: one ResNet-50 replica on a device, uint8 crops in, (embeddings, logits) out; shared by the embed
job's actors and the search side's query embedder."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from resnet_batch.architecture import build_resnet, fold_batchnorm
from resnet_batch.layouts import TORCHVISION, Layout
from resnet_batch.decode import PreprocessSpec

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ResNet50Embedder:
    """Holds one ResNet-50 replica; `embed` maps uint8 NHWC crops to (embeddings, logits)."""

    def __init__(self, state_dict: dict, spec: PreprocessSpec, *, precision: str = "fp32",
                 channels_last: bool = True, device: Optional[str] = None, compile: bool = False,
                 threads: Optional[int] = None, layout: Layout = TORCHVISION):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model = build_resnet(layout, device="meta")  # no random init: the weights are assigned right below
        model.load_state_dict(state_dict, strict=True, assign=True)
        self.fc = model.fc.to(self.device).eval()  # kept aside: logits = fc(embedding), in fp32
        model.fc = torch.nn.Identity()
        self.channels_last = channels_last
        model = model.to(self.device).eval()
        fold_batchnorm(model)  # inference only: the normalisation becomes part of each convolution
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
