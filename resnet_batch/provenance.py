"""provenance module: what produced an output, and the one check that refuses mixing two different setups."""
from __future__ import annotations

from typing import TYPE_CHECKING

from resnet_batch import __version__
from resnet_batch.config import JobConfig
from resnet_batch.decode import PreprocessSpec
from resnet_batch.errors import ProvenanceMismatch, UserError
from resnet_batch.schema import EMBEDDING_DIM

if TYPE_CHECKING:  # importing weights pulls in torch; the driver imports it in a thread while Ray starts
    from resnet_batch.weights import WeightsInfo

# Keys that must be equal for two outputs' embeddings to be comparable (resume, retry, index).
BINDING_KEYS = ("model", "weights_id", "weights_sha256", "preprocessing", "precision", "embedding_dim")


def build_provenance(cfg: JobConfig, weights: WeightsInfo, spec: PreprocessSpec) -> dict:
    """The provenance stamped into every Parquet file and the run report."""
    import torch

    from resnet_batch.torchvision_meta import torchvision_version

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
        "torchvision": torchvision_version(),
    }


def _differences(a: dict, b: dict, keys: tuple[str, ...]) -> list[str]:
    """The one provenance comparison: each binding key whose values differ, as "key: a != b"."""
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_compatible(expected: dict, found: dict, what: str, *, hint: str = "",
                     error: type[UserError] = ProvenanceMismatch, keys: tuple[str, ...] = BINDING_KEYS) -> None:
    """Refuse mixing setups (embed resume, ledger recovery, index build and update, neighbours, similar, serve):
    raise `error`("{what}: key: expected != found; ...{hint}") when a binding key differs."""
    if diffs := _differences(expected, found, keys):
        raise error(f"{what}: " + "; ".join(diffs) + hint)


def same_setup(a: dict, b: dict) -> bool:
    """True when embeddings made under provenance `a` and under `b` can be mixed (check_compatible passes)."""
    return not _differences(a, b, BINDING_KEYS)
