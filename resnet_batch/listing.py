"""listing module: one listing of the input root -> shards (the unit of work and resume) + skipped files."""
from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field
from typing import Optional

from resnet_batch.config import InputConfig
from resnet_batch.storage import ListingProgress, endpoint_of, explain, filesystem, is_s3, list_files, protocols


from resnet_batch.errors import InputError  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Shard:
    """One unit of work: a group of image files, one WebDataset tar, or one Parquet file."""

    index: int
    kind: str  # "files" | "webdataset" | "parquet"
    paths: tuple[str, ...]  # full filesystem paths (no protocol); one for tar/parquet


@dataclass
class Listing:
    """What the input root holds."""

    root: str  # filesystem path of the root (no protocol)
    protocol: str
    format: str
    shards: list[Shard]
    skipped: list[str] = field(default_factory=list)  # paths relative to root
    images: Optional[int] = None  # known for folder input; tar/parquet counts come while reading
    seconds: float = 0.0


def relative_id(path: str, root: str) -> str:
    """The stable image_id part for a path: relative to the input root, POSIX separators."""
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


def _extension(path: str) -> str:
    """The lower-case extension; gzipped tars (`.tar.gz`, `.tgz`) count as `tar`."""
    base = posixpath.basename(path).lower()
    if base.endswith((".tar.gz", ".tgz")):
        return "tar"
    return base.rsplit(".", 1)[-1] if "." in base else ""


def tar_key(name: str) -> tuple[str, str]:
    """WebDataset member naming: dir/KEY.ext, the first dot of the basename splits key and extension."""
    d, base = posixpath.split(name)
    key, _, ext = base.partition(".")
    return posixpath.join(d, key), ext.lower()


def detect_format(paths: list[str], extensions: tuple[str, ...]) -> str:
    """auto: tars mean WebDataset, .parquet files mean Parquet shards, else a folder of images."""
    exts = {_extension(p) for p in paths}
    if "tar" in exts:
        return "webdataset"
    if "parquet" in exts and not exts & set(extensions):
        return "parquet"
    return "folder"


def list_input(cfg: InputConfig, progress: bool = True) -> Listing:
    """List the input root once (one paginated listing on object stores) and cut it into shards."""
    t0 = time.perf_counter()
    fs, root = filesystem(cfg.uri, dict(cfg.storage_options))
    protocol = protocols(fs)[0]
    try:
        if fs.isfile(root):
            paths = [root]
            root = posixpath.dirname(root)
        else:
            listed = ListingProgress(cfg.uri, enabled=progress)
            paths = sorted(list_files(fs, root, listed))
            listed.done()
    except FileNotFoundError:
        raise InputError(f"input not found: {cfg.uri} (input.uri)") from None
    except Exception as err:  # access denied, unreachable endpoint, ...: say so, without a traceback
        raise InputError(explain(err, cfg.uri, "input", endpoint_of(fs) if is_s3(cfg.uri) else "")) from None
    if not paths and not fs.exists(root):
        raise InputError(f"input not found: {cfg.uri} (input.uri)")
    fmt = cfg.format if cfg.format != "auto" else detect_format(paths, cfg.extensions)
    wanted = {"folder": set(cfg.extensions), "webdataset": {"tar"}, "parquet": {"parquet"}}[fmt]
    # Files whose name starts with '_' or '.' are bookkeeping (e.g. _SUCCESS), not input.
    data = [p for p in paths if not posixpath.basename(p).startswith(("_", "."))]
    selected = [p for p in data if _extension(p) in wanted]
    skipped = [relative_id(p, root) for p in data if _extension(p) not in wanted]
    if cfg.limit and fmt == "folder":
        selected = selected[: cfg.limit]
    if not selected:
        raise InputError(
            f"no {fmt} input found under {cfg.uri}: {len(paths)} files listed, none with extension "
            f"{sorted(wanted)} (input.extensions / input.format)")
    if fmt == "folder":
        n = cfg.images_per_shard
        shards = [Shard(i, "files", tuple(selected[j:j + n])) for i, j in enumerate(range(0, len(selected), n))]
        images = len(selected)
    else:
        shards = [Shard(i, fmt, (p,)) for i, p in enumerate(selected)]
        images = None
    return Listing(root, protocol, fmt, shards, skipped, images, time.perf_counter() - t0)

