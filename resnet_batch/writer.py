"""writer module: the output folder: one Parquet part per shard, written atomically, plus run bookkeeping."""
from __future__ import annotations

import json
import posixpath
import time
from typing import Callable, Optional, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.listing import Shard
from resnet_batch.schema import STATUS_OK
from resnet_batch.storage import display_path, filesystem, list_folder, protocols, put_bytes

PROVENANCE_FILE = "_provenance.json"
MANIFEST_FILE = "_manifest.json"
REPORT_FILE = "_run_report.json"
INCOMPLETE_REPORT_FILE = "_run_report.incomplete.json"
SUCCESS_FILE = "_SUCCESS"
PART_STATS_KEY = b"resnet_batch.part_stats"
T = TypeVar("T")


from resnet_batch.errors import OutputError  # noqa: F401 (re-exported)


class OutputStore:
    """Reads and writes the files of one output location (local path or any fsspec URL)."""

    def __init__(self, uri: str, storage_options: dict, compression: str = "zstd"):
        self.uri = uri
        self.fs, self.root = filesystem(uri, dict(storage_options))
        self.compression = None if compression == "none" else compression
        self.attempts = 5

    # -- paths -------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def display(self, name: str = "") -> str:
        return display_path(protocols(self.fs)[0], self.path(name) if name else self.root)

    @staticmethod
    def part_name(shard_index: int) -> str:
        return f"part-{shard_index:06d}.parquet"

    # -- small JSON files ----------------------------------------------------------------------
    def read_json(self, name: str) -> Optional[dict]:
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, value: dict) -> None:
        self._atomic_write(name, json.dumps(value, indent=2, sort_keys=True).encode())

    def _atomic_write(self, name: str, data: bytes) -> None:
        """Write with retries; a persistent failure raises OutputError and leaves nothing partial visible."""
        try:
            with_retries(lambda: put_bytes(self.fs, self.path(name), data), attempts=self.attempts)
        except OSError as err:
            raise OutputError(f"writing {self.display(name)} failed (transient errors retried {self.attempts} times): "
                              f"{type(err).__name__}: {err}") from None


    # -- state ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.path(PROVENANCE_FILE))

    def published(self) -> bool:
        """True when a completed run's _SUCCESS marker is here."""
        return self.fs.exists(self.path(SUCCESS_FILE))

    def _ls(self) -> list[str]:
        return list_folder(self.fs, self.root)

    def done_parts(self) -> set[str]:
        names = (posixpath.basename(p) for p in self._ls())
        return {n for n in names if n.startswith("part-") and n.endswith(".parquet")}

    def clear(self) -> None:
        """Remove what a previous run wrote here (our files only), for --fresh."""
        for p in self._ls():
            if posixpath.basename(p).startswith(("part-", "_", ".part-", "._")):
                self.fs.rm(p)

    def remove_temp_files(self) -> None:
        for p in self._ls():
            if ".tmp-" in posixpath.basename(p):
                self.fs.rm(p)

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name))

    def unpublish(self) -> None:
        """A run that adds work removes the old success marker and final report first."""
        self.remove(SUCCESS_FILE)
        self.remove(REPORT_FILE)

    # -- parts ---------------------------------------------------------------------------------
    def write_part(self, shard: Shard, table: pa.Table, schema: pa.Schema, stats: dict) -> None:
        """Write one shard's rows, sorted by image_id, cast to the output schema, atomically."""
        table = table.select(schema.names).cast(schema)
        table = table.take(pc.sort_indices(table, sort_keys=[("image_id", "ascending")]))
        meta = dict(schema.metadata or {})
        meta[PART_STATS_KEY] = json.dumps(stats, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=self.compression, row_group_size=max(len(table), 1))
        self._atomic_write(self.part_name(shard.index), sink.getvalue().to_pybytes())

    def read_part(self, shard_index: int, columns: Optional[list[str]] = None) -> pa.Table:
        with self.fs.open(self.path(self.part_name(shard_index)), "rb") as f:
            return pq.read_table(f, columns=columns)

    def part_stats(self, name: str) -> dict:
        with self.fs.open(self.path(name), "rb") as f:
            meta = pq.read_metadata(f).metadata or {}
        return json.loads(meta.get(PART_STATS_KEY, b"{}"))


def with_retries(fn: Callable[[], T], attempts: int = 5, base_delay: float = 0.5,
                 retry_on: tuple[type[BaseException], ...] = (OSError,)) -> T:
    """Call fn, retrying transient errors with exponential backoff; the last error propagates.

    Permanent conditions (missing folder, permission) are not retried.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except retry_on:
            if attempt == attempts:
                raise
            time.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def failed_ids(table: pa.Table) -> frozenset:
    """The image_ids of a part's failed rows."""
    mask = pc.not_equal(table.column("status"), STATUS_OK)
    return frozenset(table.filter(mask).column("image_id").to_pylist())
