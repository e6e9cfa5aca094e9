"""weights module: resolve the configured ResNet-50 weights once, with an id and a content hash."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from resnet_batch.layouts import BY_NAME, TORCHVISION, Layout
from resnet_batch.config import ModelConfig
from resnet_batch.errors import WeightsError as WeightsUnavailableError  # the configured weights cannot be had
from resnet_batch.redact import redact_text, safe_uri
from resnet_batch.state_dicts import (categories, hashed_file_state_dict,  # noqa: F401 (re-exported)
                                      state_dict_from_bytes, state_dict_sha256)
from resnet_batch.text import printable
from resnet_batch.torchvision_meta import RESNET50_WEIGHTS
from resnet_batch.weights_keras import (KERAS_LAYOUT, KERAS_NAME, KERAS_STATE_SHA256, KERAS_TRANSFORMS,
                                        keras_state_dict)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsInfo:
    """What the output's provenance records about the weights."""

    weights_id: str  # "IMAGENET1K_V2", "checkpoint:<uri without userinfo/query>" or "random(seed=N)"
    sha256: str  # content hash of the state dict (keys, dtypes, shapes, values)
    transforms: str  # the torchvision enum whose preprocessing and labels are used
    layout: Layout = field(default=TORCHVISION)  # the network the weights need (provenance `model`)

    def as_dict(self) -> dict:
        return {"model": self.layout.model, "weights_id": self.weights_id, "weights_sha256": self.sha256,
                "transforms": self.transforms}


def is_enum_name(name: str) -> bool:
    """A member of torchvision's ResNet50_Weights (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT)."""
    return name in RESNET50_WEIGHTS


def is_named(name: str) -> bool:
    """A weights name resolve_weights knows: torchvision's enums and the package-registry weights."""
    return is_enum_name(name) or name == KERAS_NAME


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Seeded random ResNet-50 weights (torchvision's own init, the same values as torchvision's resnet50 gives):
    reproducible for a torch version."""
    from resnet_batch.architecture import build_resnet

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build_resnet(TORCHVISION).state_dict()
    finally:
        torch.random.set_rng_state(gen_state)


def _load_enum(name: str) -> dict[str, torch.Tensor]:
    return hub_state_dict(RESNET50_WEIGHTS[name].url, f"torchvision weights ResNet50_Weights.{name}")


def hub_state_dict(url: str, what: str) -> dict[str, torch.Tensor]:
    """Published weights through the torch hub cache ($TORCH_HOME/hub/checkpoints), downloaded there if missing
    and the network allows; the sha256 prefix in the file's name (resnet50-11ad3fa6.pth) is the published hash.

    The cached bytes are hashed before anything reads them, then loaded with weights_only=True: a file planted
    in the cache can neither pass as the weights nor run code (torchvision's own loader unpickles it first).
    """
    from torch.hub import HASH_REGEX, download_url_to_file, get_dir

    fname = url.rsplit("/", 1)[-1]
    expected = HASH_REGEX.search(fname).group(1)
    cached = os.path.join(get_dir(), "checkpoints", fname)
    if not os.path.exists(cached):
        print(f"downloading {url} to {cached}", file=sys.stderr, flush=True)
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            download_url_to_file(url, cached, hash_prefix=expected, progress=False)
        except Exception as err:
            raise WeightsUnavailableError(
                f"could not download {what} ({type(err).__name__}: {printable(redact_text(str(err)))}). Download "
                f"{url} on a machine with internet and place it at {cached} (or set TORCH_HOME), or set "
                "model.weights to a checkpoint path or URL (s3://...).") from None
    return hashed_file_state_dict(cached, expected, "the published hash",
                                  f"delete the file and download {url} again, or set model.weights to a checkpoint "
                                  "path")


def _load_checkpoint(uri: str, storage_options: Optional[dict]) -> dict[str, torch.Tensor]:
    import fsspec

    shown = printable(safe_uri(uri))
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightsUnavailableError(f"checkpoint not found: {shown} (model.weights)") from None
    except Exception as err:
        raise WeightsUnavailableError(
            f"could not read checkpoint {shown}: {type(err).__name__}: {printable(redact_text(str(err)))}") from None
    return state_dict_from_bytes(data, f"checkpoint {shown}", "save it with torch.save(model.state_dict(), path)")


def check_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Fail with a clear message unless the state dict fits torchvision's ResNet-50 exactly (either layout: the
    keys and shapes are the same)."""
    from resnet_batch.architecture import build_resnet

    expected = build_resnet(TORCHVISION, device="meta").state_dict()
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
    elif cfg.weights == KERAS_NAME:
        sd, wid, transforms = keras_state_dict(cfg.package, storage_options), KERAS_NAME, KERAS_TRANSFORMS
    else:
        sd = _load_checkpoint(cfg.weights, storage_options)
        wid, transforms = f"checkpoint:{safe_uri(cfg.weights)}", cfg.transforms  # no token, no password
    check_state_dict(sd, wid)
    sha = state_dict_sha256(sd)
    if sha == KERAS_STATE_SHA256 and wid != KERAS_NAME:
        # IMAGENET1K_KERAS handed back as a file (the cached conversion, a copy of it): the same weights, so the same
        # layout, preprocessing and provenance; built as v1.5 they would give wrong features without any error
        if cfg.layout not in ("auto", KERAS_LAYOUT.name):
            raise WeightsUnavailableError(
                f"{wid} holds the {KERAS_NAME} weights (by their content hash), which need layout "
                f"{KERAS_LAYOUT.name}, not model.layout={cfg.layout}: leave model.layout at auto")
        log.info("%s holds the %s weights (by their content hash): layout %s, preprocessing and labels %s", wid,
                 KERAS_NAME, KERAS_LAYOUT.name, KERAS_TRANSFORMS)
        wid, transforms = KERAS_NAME, KERAS_TRANSFORMS
    layout = KERAS_LAYOUT if wid == KERAS_NAME else TORCHVISION if cfg.layout == "auto" else BY_NAME[cfg.layout]
    return WeightsInfo(wid, sha, transforms, layout), sd
