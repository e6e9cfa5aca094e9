"""layouts module: the two ResNet-50 layouts weights come in and how each is named in provenance (no torch: the
driver and a model actor's settings name a layout before torch is imported; architecture.py builds the network)."""
from __future__ import annotations

from dataclasses import dataclass

MODEL = "torchvision.resnet50"  # the provenance `model` of torchvision's own layout, as every output before had it


@dataclass(frozen=True)
class Layout:
    """Where a downsampling bottleneck strides and the batch-norm epsilon: weights trained in one layout give
    wrong features in the other, so the layout travels with the weights and is recorded in the provenance."""

    name: str  # "v1.5": stride on the 3x3 conv (torchvision); "v1": stride on the first 1x1 conv (MSRA, Keras)
    bn_eps: float

    @property
    def model(self) -> str:
        """The provenance `model` value: torchvision's layout keeps the name every earlier output recorded."""
        return MODEL if self == TORCHVISION else f"{MODEL}:{self.name}(bn_eps={self.bn_eps:g})"


TORCHVISION = Layout("v1.5", 1e-5)
MSRA_V1 = Layout("v1", 1e-3)  # He et al. 2015 as released, and the Keras port of it
_LAYOUTS = {layout.model: layout for layout in (TORCHVISION, MSRA_V1)}
BY_NAME = {layout.name: layout for layout in (TORCHVISION, MSRA_V1)}  # model.layout's values (but auto)


def layout_of(model: str) -> Layout:
    """The layout a provenance `model` value names (the inverse of Layout.model)."""
    try:
        return _LAYOUTS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r} (known: {', '.join(_LAYOUTS)})") from None
