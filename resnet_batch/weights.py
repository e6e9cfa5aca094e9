"""weights module: resolve the configured ResNet-50 weights once, with an id and a content hash."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Optional

import torch

from resnet_batch.config import ModelConfig


from resnet_batch.errors import WeightsError as WeightsUnavailableError  # noqa: E402 (the configured weights cannot be had)


@dataclass(frozen=True)
class WeightsInfo:
    """What the output's provenance records about the weights."""

    weights_id: str  # "IMAGENET1K_V2", "checkpoint:<uri>" or "random(seed=N)"
    sha256: str  # content hash of the state dict (keys, dtypes, shapes, values)
    transforms: str  # the torchvision enum whose preprocessing and labels are used

    def as_dict(self) -> dict:
        return {"weights_id": self.weights_id, "weights_sha256": self.sha256, "transforms": self.transforms}


def is_enum_name(name: str) -> bool:
    from torchvision.models import ResNet50_Weights

    return name in ResNet50_Weights.__members__


def categories(transforms: str) -> tuple[str, ...]:
    """The 1000 ImageNet class names from torchvision's weights metadata."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights[transforms].meta["categories"])


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict that does not depend on how it was serialised."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Seeded random ResNet-50 weights (torchvision's own init): reproducible for a torch version."""
    from torchvision.models import resnet50

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return resnet50(weights=None).state_dict()
    finally:
        torch.random.set_rng_state(gen_state)


def _load_enum(name: str) -> dict[str, torch.Tensor]:
    """torchvision weights through the torch hub cache (downloaded there if the network allows)."""
    import os

    from torch.hub import get_dir
    from torchvision.models import ResNet50_Weights

    w = ResNet50_Weights[name]
    fname = w.url.rsplit("/", 1)[-1]
    cached = os.path.join(get_dir(), "checkpoints", fname)
    try:
        sd = w.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"could not load torchvision weights ResNet50_Weights.{name} ({type(err).__name__}: {err}). "
            f"Download {w.url} on a machine with internet and place it at {cached} "
            "(or set TORCH_HOME), or set model.weights to a checkpoint path or URL (s3://...)."
        ) from None
    # torch only checks the hash when it downloads; a cached file is checked here too.
    expected = fname.rsplit("-", 1)[-1].split(".")[0]
    with open(cached, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if not actual.startswith(expected):
        raise WeightsUnavailableError(
            f"cached weights {cached} do not match the published hash ({actual[:8]} != {expected}): "
            f"delete the file and download {w.url} again, or set model.weights to a checkpoint path.")
    return sd


def _load_checkpoint(uri: str, storage_options: Optional[dict]) -> dict[str, torch.Tensor]:
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightsUnavailableError(f"checkpoint not found: {uri} (model.weights)") from None
    except Exception as err:
        raise WeightsUnavailableError(f"could not read checkpoint {uri}: {type(err).__name__}: {err}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"checkpoint {uri} is not a loadable state dict (torch.load weights_only=True): {err}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"checkpoint {uri} does not hold a ResNet-50 state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Fail with a clear message unless the state dict fits torchvision's ResNet-50 exactly."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50(weights=None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"wrong shapes for {wrong[:3]}")
        raise WeightsUnavailableError(f"{source} is not a torchvision ResNet-50 state dict: " + "; ".join(parts))


def resolve_weights(cfg: ModelConfig, storage_options: Optional[dict] = None) -> tuple[WeightsInfo, dict]:
    """Load the configured weights once (for the driver to hand to every actor) and describe them."""
    if cfg.weights == "random":
        sd, wid, transforms = random_state_dict(cfg.seed), f"random(seed={cfg.seed})", cfg.transforms
    elif is_enum_name(cfg.weights):
        sd, wid, transforms = _load_enum(cfg.weights), cfg.weights, cfg.weights
    else:
        sd = _load_checkpoint(cfg.weights, storage_options)
        wid, transforms = f"checkpoint:{cfg.weights}", cfg.transforms
    check_state_dict(sd, wid)
    return WeightsInfo(wid, state_dict_sha256(sd), transforms), sd
