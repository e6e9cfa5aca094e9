"""store module: the one owner of an output folder: the one way a file is written there (atomic, transient
errors retried for the window), the one rule for what is a part, and deleting exactly what we wrote, nothing else.

Embed outputs, neighbours outputs, index folders and the gallery page all write through `write_file`."""
from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.errors import OutputError
from resnet_batch.retry import retrying
from resnet_batch.schema import PART_STATS_KEY, PROVENANCE_KEY, WRITER_KEY
from resnet_batch.storage import display_path, filesystem, list_folder, protocols

PROVENANCE_FILE = "_provenance.json"
STATE_FILE = "_state.json"
REPORT_FILE = "_run_report.json"
INCOMPLETE_REPORT_FILE = "_run_report.incomplete.json"
SUCCESS_FILE = "_SUCCESS"
LOCK_FILE = "_lock"
MANIFEST_DIR = "_manifest"
LEDGER_DIR = "_ledger"
SYNC_DIR = "_sync"
LEGACY_MANIFEST = "_manifest.json"  # the layout before 0.2 (one JSON plan); refused with a clear message
OUR_FILES = (PROVENANCE_FILE, STATE_FILE, REPORT_FILE, INCOMPLETE_REPORT_FILE, SUCCESS_FILE, LOCK_FILE)
OUR_DIRS = (MANIFEST_DIR, LEDGER_DIR, SYNC_DIR)
RETRY_WINDOW_S = 300.0  # how long a write keeps retrying transient errors when the caller names no window
# The one rule for what is a part (of an embed output or a neighbours output): part-SSSSSS[-CCCC].parquet.
# Spark's part-00000-<uuid>.snappy.parquet and anything else a person put there are never ours.
PART_RE = re.compile(r"^part-(\d{6,})(?:-(\d{4,}))?\.parquet$")
# the names this job writes in its sub-folders: manifest pieces, ledger pieces, sync plans (what --fresh deletes)
OUR_PIECES = {MANIFEST_DIR: re.compile(r"^m-\d{6,}-\d{6,}\.parquet$"),
              LEDGER_DIR: re.compile(r"^l-\d{4,}-(?:\d{6,}|compact)\.parquet$"),
              SYNC_DIR: re.compile(r"^(?:entries|drops|copies)-\d{4,}(?:-[\w.-]+)?\.parquet$")}
# _put_atomic's temporary names for our own files only: ".NAME.tmp-xxxxxxxx" (parts, `_` files, pieces)
TEMP_RE = re.compile(r"^\.(part-\d{6,}(?:-\d{4,})?\.parquet|_[A-Za-z_.]+|[ml]-[\w-]+\.parquet"
                     r"|(?:entries|drops|copies)-[\w-]+\.parquet)\.tmp-[0-9a-f]{8}$")
Content = Union[bytes, dict, pa.Table]


def part_name(shard: int, chunk: int = -1) -> str:
    """part-SSSSSS.parquet for a folder shard; part-SSSSSS-CCCC.parquet for chunk C of a tar/Parquet shard."""
    return f"part-{shard:06d}.parquet" if chunk < 0 else f"part-{shard:06d}-{chunk:04d}.parquet"


def parse_part(name: str) -> Optional[tuple[int, int]]:
    """(shard, chunk) of a part file name of ours (chunk -1 for a folder shard), else None: the one test of
    whether a file name is a part."""
    m = PART_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)) if m.group(2) is not None else -1


# -- parts (written by the model actors) ------------------------------------------------------------


@dataclass(frozen=True)
class PartSettings:
    """Where and how the actors write parts; one frozen object handed to every actor."""

    uri: str
    storage_options: dict
    schema: pa.Schema  # output schema with pass-through columns and the provenance metadata
    compression: Optional[str]
    embedding_dtype: str
    retry_window_s: float
    run: int

    def fs(self):
        return filesystem(self.uri, dict(self.storage_options))


def encode_part(table: pa.Table, schema: pa.Schema, record: dict, compression: Optional[str],
                node_id: str, pid: int) -> bytes:
    """A part's Parquet bytes: rows sorted by image_id, cast to the output schema, stamped with the
    provenance (in `schema`), the part's record and who wrote it."""
    table = table.select(schema.names).cast(schema)
    table = table.take(pc.sort_indices(table, sort_keys=[("image_id", "ascending")]))
    meta = dict(schema.metadata or {})
    meta[PART_STATS_KEY] = json.dumps(record, sort_keys=True).encode()
    meta[WRITER_KEY] = json.dumps({"node_id": node_id, "pid": pid, "host": socket.gethostname()}).encode()
    return parquet_bytes(table.replace_schema_metadata(meta), compression=compression,
                         row_group_size=max(len(table), 1))


def _put_atomic(fs, path: str, data: bytes) -> None:
    """Write a file so that readers never see it half-written: locally a hidden temp file (`.NAME.tmp-*`),
    fsynced, then renamed; on object stores one PUT, which publishes the object only when it completes."""
    if "file" not in protocols(fs):
        fs.pipe_file(path, data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parquet_bytes(table: pa.Table, **options) -> bytes:
    """A table as Parquet file bytes; `options` are pyarrow.parquet.write_table's (compression, encodings...)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().to_pybytes()


def json_bytes(value: dict) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode()


def write_file(fs, path: str, content: Content, window_s: float = RETRY_WINDOW_S, **parquet) -> int:
    """The one way a file is written into an output: bytes as they are, a dict as JSON, a table as Parquet
    (`parquet`: write_table's options); atomic, transient errors retried for `window_s`. Returns its size."""
    if isinstance(content, pa.Table):
        data = parquet_bytes(content, **parquet)
    else:
        data = json_bytes(content) if isinstance(content, dict) else content
    retrying(lambda: _put_atomic(fs, path, data), window_s, f"writing {path}")
    return len(data)


def read_parquet(fs, path: str, columns: Optional[list[str]] = None) -> pa.Table:
    """A Parquet file read whole into memory that Arrow owns, then decoded.

    Never a Python file object handed to Arrow: its reader keeps the object, and the last reference can be
    dropped by one of Arrow's pool threads a moment after the read returned; that release needs the GIL, and
    a thread asking for the GIL while the interpreter exits is ended inside C++ frames: `terminate called
    without an active exception`, SIGABRT (seen as `status` exiting 134 under load)."""
    with fs.open(path, "rb") as f:
        data = f.read()
    buf = pa.allocate_buffer(len(data))
    memoryview(buf).cast("B")[:] = data
    return pq.read_table(pa.BufferReader(buf), columns=columns)


def part_record(fs, path: str, with_provenance: bool = False):
    """The record a part carries in its own metadata (None when it has none: not written by this job);
    with_provenance: (record, provenance)."""
    with fs.open(path, "rb") as f:
        meta = pq.read_metadata(f).metadata or {}
    raw = meta.get(PART_STATS_KEY)
    record = json.loads(raw) if raw else None
    if not with_provenance:
        return record
    prov = meta.get(PROVENANCE_KEY)
    return record, json.loads(prov) if prov else None


# -- the output folder ------------------------------------------------------------------------------


class OutputStore:
    """One output location (local path or any fsspec URL): its files, written and deleted with the retry window."""

    def __init__(self, uri: str, storage_options: dict, retry_window_s: float = RETRY_WINDOW_S):
        self.uri = uri
        self.storage_options = dict(storage_options)
        self.fs, self.root = filesystem(uri, self.storage_options)
        self.window = retry_window_s
        # Called before every write or delete of the run's bookkeeping: the output lock sets it to its
        # ensure() (raises LockLost when the lock is no longer this run's), so no commit point writes blind.
        self.guard: Optional[Callable[[], None]] = None

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def display(self, name: str = "") -> str:
        return display_path(protocols(self.fs)[0], self.path(name) if name else self.root)

    def is_local(self) -> bool:
        return "file" in protocols(self.fs)

    # -- small files -----------------------------------------------------------------------------
    def read_json(self, name: str) -> Optional[dict]:
        def read():
            try:
                with self.fs.open(self.path(name), "rb") as f:
                    return json.loads(f.read())
            except FileNotFoundError:
                return None
        try:
            return retrying(read, self.window, f"reading {self.display(name)}")
        except ValueError as err:
            raise OutputError(f"{self.display(name)} is not valid JSON ({err}); it was not written by this job, "
                              "or was damaged: use another output.uri, or --fresh to start over") from None

    def write(self, name: str, content: Content, **parquet) -> int:
        """Write `name` (bytes, a dict as JSON, a table as Parquet) through `write_file`, after the guard (the
        run still holds the output); returns its size."""
        if self.guard is not None:
            self.guard()
        return write_file(self.fs, self.path(name), content, self.window, **parquet)

    def remove(self, name: str) -> None:
        if self.guard is not None:
            self.guard()
        def rm():
            try:
                self.fs.rm(self.path(name))
            except FileNotFoundError:
                pass
        retrying(rm, self.window, f"deleting {self.display(name)}")

    def invalidate(self) -> None:
        """Forget listings cached by the filesystem (s3fs), so the next listing sees what workers wrote."""
        self.fs.invalidate_cache(self.root)

    # -- state -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The names directly in the output folder (none when it does not exist yet)."""
        self.invalidate()
        return [posixpath.basename(p.rstrip("/")) for p in
                retrying(lambda: list_folder(self.fs, self.root), self.window, f"listing {self.display()}")]

    def list_dir(self, sub: str) -> list[str]:
        """File names in a sub-folder of ours (_manifest, _ledger, _sync)."""
        self.fs.invalidate_cache(self.path(sub))
        paths = retrying(lambda: list_folder(self.fs, self.path(sub)), self.window, f"listing {self.display(sub)}")
        return sorted(posixpath.basename(p) for p in paths)

    def is_output(self, names: Optional[list[str]] = None) -> bool:
        """True when this folder holds a resnet-batch output (its provenance or state file)."""
        names = self.names() if names is None else names
        return bool(set(names) & set(EMBED_OUTPUT.marks))

    def published(self) -> bool:
        return self.fs.exists(self.path(SUCCESS_FILE))

    def unpublish(self) -> None:
        """A run that changes the output removes the success marker and the final report first."""
        self.remove(SUCCESS_FILE)
        self.remove(REPORT_FILE)

    def parts(self, names: Optional[list[str]] = None) -> dict[str, tuple[int, int]]:
        """Part files of ours in the folder: name -> (shard, chunk)."""
        names = self.names() if names is None else names
        return {n: sc for n in names if (sc := parse_part(n)) is not None}

    # -- deleting only our own files -----------------------------------------------------------
    def clear(self, owner: Optional["Ownership"] = None) -> list[str]:
        """Delete what we wrote here (the exact names `owner` claims), nothing else; refuses a folder that holds
        other files but carries none of the owner's marks. Returns what was deleted. Default: an embed output
        (--fresh)."""
        owner = owner or EMBED_OUTPUT
        names = self.names()
        self.check_clearable(owner, names)
        ours = [n for n in names if owner.files(n)]
        for n in ours:
            if n not in owner.kept:  # the lock is this run's own
                self.remove(n)
        for d in owner.dirs:
            if d in names:
                for n in self.list_dir(d):
                    if n and (OUR_PIECES[d].match(n) or TEMP_RE.match(n)):  # only names this job writes there
                        self.remove(f"{d}/{n}")
                self._rmdir(d)
        return ours

    def check_clearable(self, owner: Optional["Ownership"] = None, names: Optional[list[str]] = None) -> None:
        """Refuse (owner.refusal) a folder that holds other files but carries none of the owner's marks: what
        clear() checks first, for a command to call before it writes anything there (a lock, say)."""
        owner = owner or EMBED_OUTPUT
        names = self.names() if names is None else names
        if names and not set(names) & set(owner.marks) and not set(names) <= owner.kept:
            raise owner.refusal(self.display(), names)

    def _rmdir(self, d: str) -> None:
        if self.is_local():
            try:
                os.rmdir(self.path(d))
            except OSError:
                pass  # not empty: something of someone else's is in there; leave it

    def remove_temp_files(self, names: Optional[list[str]] = None) -> int:
        """Temporary files that an interrupted atomic write of ours left behind (exact pattern of ours)."""
        stale = [n for n in (self.names() if names is None else names) if TEMP_RE.match(n)]
        for n in stale:
            self.remove(n)
        for d in OUR_DIRS:
            for n in self.list_dir(d) if names is None or d in names else ():
                if TEMP_RE.match(n):
                    self.remove(f"{d}/{n}")
        return len(stale)



@dataclass(frozen=True)
class Ownership:
    """Which folders are ours and which names in them we wrote, so that clearing one deletes those alone."""

    marks: tuple[str, ...]  # a folder holding any of these is one of ours
    files: Callable[[str], bool]  # the names (directly in the folder) that we wrote
    refusal: Callable[[str, list[str]], OutputError]  # the error for a folder that is not ours: (shown, names)
    dirs: tuple[str, ...] = ()  # sub-folders of ours, emptied
    kept: frozenset = frozenset()  # names never deleted (and that alone do not make a folder foreign)


def _not_an_embed_output(shown: str, names: list[str]) -> OutputError:
    count = f"{len(names)} {'entry' if len(names) == 1 else 'entries'}"
    return OutputError(f"--fresh: {shown} is not a resnet-batch output (no {PROVENANCE_FILE} or {STATE_FILE}) and "
                       f"is not empty ({count}, e.g. {names[0]!r}); refusing to delete anything there: "
                       "use an empty or new output.uri")


EMBED_OUTPUT = Ownership(
    marks=(PROVENANCE_FILE, STATE_FILE),
    files=lambda n: n in OUR_FILES or n == LEGACY_MANIFEST or parse_part(n) is not None or bool(TEMP_RE.match(n)),
    refusal=_not_an_embed_output, dirs=OUR_DIRS, kept=frozenset({LOCK_FILE}))
