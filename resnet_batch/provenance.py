"""provenance module: what produced an output, and the check that refuses mixing two different setups."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from resnet_batch import __version__
from resnet_batch.config import JobConfig
from resnet_batch.decode import PreprocessSpec
from resnet_batch.schema import EMBEDDING_DIM

if TYPE_CHECKING:  # importing weights pulls in torch; the driver imports it in a thread while Ray starts
    from resnet_batch.weights import WeightsInfo

# Keys that must be equal for two outputs' embeddings to be comparable (resume, retry, index).
BINDING_KEYS = ("model", "weights_id", "weights_sha256", "preprocessing", "precision", "embedding_dim")


def build_provenance(cfg: JobConfig, weights: WeightsInfo, spec: PreprocessSpec) -> dict:
    """The provenance stamped into every Parquet file and the run report."""
    import torch
    import torchvision

    return {
        "package": "resnet-batch",
        "version": __version__,
        **weights.as_dict(),  # model (the layout the weights need), weights_id, weights_sha256, transforms
        "preprocessing": {**spec.as_dict(), "jpeg_draft": cfg.input.jpeg_draft, "exif_transpose": True,
                          "max_pixels": cfg.input.max_pixels},
        "precision": cfg.model.precision,
        "channels_last": cfg.model.channels_last,
        "topk": cfg.model.topk,
        "embedding_dim": EMBEDDING_DIM,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def differences(old: dict, new: dict, keys=BINDING_KEYS) -> list[str]:
    """Human-readable list of binding differences between two provenance dicts (empty when compatible)."""
    return [f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


from resnet_batch.errors import ProvenanceMismatch  # noqa: E402 (re-exported)


def check_compatible(old: Optional[dict], new: dict, what: str) -> None:
    if old is None:
        return
    diffs = differences(old, new)
    if diffs:
        raise ProvenanceMismatch(f"{what} was written with a different setup: " + "; ".join(diffs))
