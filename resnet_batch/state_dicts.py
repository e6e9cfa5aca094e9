"""state_dicts module: ResNet-50 state dicts as data: read from bytes with weights_only=True (never code), from a cached
file only when its bytes match a hash, hashed by content; and the ImageNet category names."""
from __future__ import annotations

import hashlib
import io
import re

import torch

from resnet_batch.errors import WeightsError
from resnet_batch.redact import redact_text
from resnet_batch.text import printable


def categories(transforms: str) -> tuple[str, ...]:
    """The 1000 ImageNet class names of the weights `transforms` names (torchvision's, for every ResNet-50 member)."""
    from resnet_batch.torchvision_meta import RESNET50_WEIGHTS, imagenet_categories

    if transforms not in RESNET50_WEIGHTS:
        raise KeyError(transforms)
    return imagenet_categories()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict that does not depend on how it was serialised."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hashed_file_state_dict(path: str, expected: str, against: str, fix: str) -> dict[str, torch.Tensor]:
    """A cached state dict file whose bytes' sha256 starts with `expected` (else nothing is loaded from it), read
    with torch.load(weights_only=True). `against` names where the hash comes from; `fix` says what to do."""
    with open(path, "rb") as f:
        data = f.read()  # read once: the bytes hashed are the bytes loaded
    actual = hashlib.sha256(data).hexdigest()
    if not actual.startswith(expected):
        raise WeightsError(
            f"cached weights {path} do not match {against} ({actual[:8]} != {expected[:8]}), so nothing was loaded "
            f"from them: {fix}.")
    return state_dict_from_bytes(data, f"cached weights {path}", fix)


def state_dict_from_bytes(data: bytes, source: str, fix: str) -> dict[str, torch.Tensor]:
    """A state dict from serialised bytes, through torch.load(weights_only=True) only: tensors and plain
    containers, never code. `fix` says what to do when the bytes are something else."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"{source} is not a plain state dict; torch.load(weights_only=True) refused it ({_refusal(err)}): "
            f"{fix}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source} does not hold a ResNet-50 state dict: {fix}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _refusal(err: BaseException) -> str:
    """Why torch.load(weights_only=True) refused, in one line (torch's own text suggests weights_only=False)."""
    text = str(err)
    if m := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return f"it names {m.group(1)}, which is code, not data"
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    line = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
    return printable(redact_text(f"{type(err).__name__}: {line}"[:300]))
