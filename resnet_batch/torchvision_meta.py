"""torchvision_meta module: what a run needs to know about torchvision's ResNet-50 weights (their names, where they
are published, their preprocessing, the ImageNet class names) and torchvision's version, without importing
torchvision.

Importing torchvision costs about 1.2 s of CPU (it imports torch._dynamo through torchvision.ops) at the start of
every driver, on a 2-core node as much as Ray's own start. The weights' table is fixed for the pinned torchvision
(tests/test_model.py checks it against ResNet50_Weights); the class names and the version are read from
torchvision's own files, and torchvision is imported only where those cannot be read.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TorchvisionWeights:
    """One member of torchvision's ResNet50_Weights: its published file and its transforms() (bilinear)."""

    url: str
    resize_size: int
    crop_size: int = 224


_V1 = TorchvisionWeights("https://download.pytorch.org/models/resnet50-0676ba61.pth", 256)
_V2 = TorchvisionWeights("https://download.pytorch.org/models/resnet50-11ad3fa6.pth", 232)
RESNET50_WEIGHTS = {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2, "DEFAULT": _V2}  # DEFAULT: torchvision's alias


def _package_file(*parts: str) -> Optional[str]:
    """A file of the installed torchvision package, found without importing it (None when it is not there)."""
    spec = importlib.util.find_spec("torchvision")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, *parts)
        if os.path.isfile(path):
            return path
    return None


def _literal(path: Optional[str], name: str):
    """The value of a top-level `name = <literal>` in a Python file, or None."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


@functools.lru_cache(maxsize=None)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names of every ResNet50_Weights member (torchvision's models/_meta.py)."""
    names = _literal(_package_file("models", "_meta.py"), "_IMAGENET_CATEGORIES")
    if isinstance(names, list) and len(names) == 1000 and all(isinstance(n, str) for n in names):
        return tuple(names)
    from torchvision.models import ResNet50_Weights  # the file moved or changed: ask torchvision itself

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@functools.lru_cache(maxsize=None)
def torchvision_version() -> str:
    """torchvision.__version__ (with its local tag, e.g. 0.29.1+cu130), from its version.py."""
    version = _literal(_package_file("version.py"), "__version__")
    if isinstance(version, str) and re.match(r"\d+\.\d+", version):
        return version
    import torchvision

    return torchvision.__version__
