"""pieces module: the one piece log of an output: Parquet pieces in one of its sub-folders, each written whole
(atomically, retried) and read back all at once; the manifest (`_manifest/`), the ledger (`_ledger/`) and a
sync plan (`_sync/`) are each one."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import pyarrow as pa

from resnet_batch.output.store import OutputStore, read_parquet

READ_THREADS = 16  # pieces read at once


class PieceLog:
    """The pieces in `folder` whose names `match` accepts, all of `schema`; `parquet` are the pieces' write
    options (compression, encodings)."""

    def __init__(self, store: OutputStore, folder: str, schema: pa.Schema, match: Callable[[str], bool],
                 **parquet):
        self.store, self.folder, self.schema, self.match = store, folder, schema, match
        self.parquet = parquet

    def path(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def names(self) -> list[str]:
        """The pieces there now, sorted by name."""
        return [n for n in self.store.list_dir(self.folder) if self.match(n)]

    def write(self, name: str, table: pa.Table) -> int:
        """Store one piece (replacing one of the same name); returns its size in bytes."""
        return self.store.write(self.path(name), table.cast(self.schema), **self.parquet)

    def read_one(self, name: str) -> pa.Table:
        return read_parquet(self.store.fs, self.store.path(self.path(name))).cast(self.schema)

    def read(self, names: Optional[list[str]] = None) -> pa.Table:
        """These pieces (default: all) as one table, read concurrently; empty when there are none."""
        names = self.names() if names is None else names
        if not names:
            return self.schema.empty_table()
        with ThreadPoolExecutor(READ_THREADS) as pool:
            return pa.concat_tables(list(pool.map(self.read_one, names)))

    def remove(self, name: str) -> None:
        self.store.remove(self.path(name))
