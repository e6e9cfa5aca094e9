"""manifest module: an output's plan as Parquet pieces: every input object (path, size, mtime_ns or etag) and
the shard it belongs to. Written piece by piece while the listing runs (a shard is handed to the pipeline
only once its piece is stored), read in one go by the next run to resume or sync."""
from __future__ import annotations

import time
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.output.pieces import PieceLog
from resnet_batch.output.store import MANIFEST_DIR, OutputStore
from resnet_batch.schema import ENTRY_SCHEMA

MANIFEST_SCHEMA = pa.schema(list(ENTRY_SCHEMA) + [pa.field("shard", pa.int64(), nullable=False)])
PIECE_ENTRIES = 100_000  # entries per piece at most
PIECE_FLUSH_S = 2.0  # a piece is written at least this often while shards wait for it
# A piece's encoding: paths delta-encoded (sorted paths share prefixes), zstd; ~20-30 B per entry.
PIECE_ENCODING = {"compression": "zstd", "use_dictionary": ["etag"], "write_statistics": False,
                  "column_encoding": {"path": "DELTA_BYTE_ARRAY", "size": "DELTA_BINARY_PACKED",
                                      "mtime_ns": "DELTA_BINARY_PACKED", "shard": "DELTA_BINARY_PACKED"}}


def piece_name(first: int, last: int) -> str:
    return f"m-{first:06d}-{last:06d}.parquet"


def piece_range(name: str) -> Optional[tuple[int, int]]:
    """(first, last) shard of a piece file name, else None."""
    parts = name.removesuffix(".parquet").split("-")
    if len(parts) != 3 or parts[0] != "m" or not name.endswith(".parquet"):
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None


def manifest_log(store: OutputStore) -> PieceLog:
    """The manifest's piece log: `_manifest/m-FIRST-LAST.parquet`, each holding whole shards FIRST..LAST."""
    return PieceLog(store, MANIFEST_DIR, MANIFEST_SCHEMA, lambda n: piece_range(n) is not None, **PIECE_ENCODING)


class ManifestWriter:
    """Buffers shards (anything with an `.index`: the listing's Shard) with their entries and stores them as
    pieces; `release(shards)` is called with the shards of each piece once it is stored (so no part is ever
    written for a shard the manifest lacks)."""

    def __init__(self, store: OutputStore, release: Callable[[list], None],
                 piece_entries: int = PIECE_ENTRIES, flush_s: float = PIECE_FLUSH_S):
        self.log, self.release = manifest_log(store), release
        self.piece_entries, self.flush_s = piece_entries, flush_s
        self.shards: list = []
        self.tables: list[pa.Table] = []
        self.rows = 0
        self.last_flush = time.monotonic()
        self.pieces = 0
        self.bytes = 0

    def add(self, shard, entries: pa.Table) -> None:
        self.shards.append(shard)
        self.tables.append(entries.append_column("shard", pa.array([shard.index] * len(entries), pa.int64())))
        self.rows += len(entries)
        if self.rows >= self.piece_entries or time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if not self.shards:
            return
        self.bytes += self.log.write(piece_name(self.shards[0].index, self.shards[-1].index),
                                     pa.concat_tables(self.tables))
        self.pieces += 1
        shards = self.shards
        self.shards, self.tables, self.rows = [], [], 0
        self.last_flush = time.monotonic()
        self.release(shards)


def read_manifest(store: OutputStore) -> pa.Table:
    """Every entry of the manifest (all pieces, read concurrently)."""
    return manifest_log(store).read()


def entry_keys(table: pa.Table) -> pa.Array:
    """shard + NUL + path of each entry, for matching manifest entries."""
    return pc.binary_join_element_wise(pc.cast(pc.cast(table.column("shard"), pa.string()), pa.binary()),
                                       table.column("path"), pa.scalar(b"\x00"))


def drop_from_piece(store: OutputStore, name: str, drops: pa.Table) -> int:
    """One manifest piece rewritten without these (shard, path) entries (deleted when nothing is left).
    Idempotent: a piece that no longer holds them (or is gone) is left alone. Returns 1 when the piece changed."""
    log = manifest_log(store)
    try:
        piece = log.read_one(name)
    except FileNotFoundError:
        return 0
    keep = pc.invert(pc.is_in(entry_keys(piece), value_set=entry_keys(drops)))
    if pc.all(keep).as_py():
        return 0
    kept = piece.filter(keep)
    if len(kept):
        log.write(name, kept)
    else:
        log.remove(name)
    return 1


def drop_entries(store: OutputStore, drops: pa.Table) -> int:
    """Every piece holding some of these (shard, path) entries rewritten without them, one after another (the
    sync's parallel tasks call drop_from_piece for one piece each). Returns pieces touched."""
    if not len(drops):
        return 0
    shards = set(drops.column("shard").to_pylist())
    return sum(drop_from_piece(store, name, drops) for name in manifest_log(store).names()
               if any(piece_range(name)[0] <= s <= piece_range(name)[1] for s in shards))


def write_entries(store: OutputStore, entries: pa.Table) -> int:
    """Store entries (MANIFEST_SCHEMA, any shards) as pieces of whole shards; returns pieces written."""
    if not len(entries):
        return 0
    entries = entries.cast(MANIFEST_SCHEMA).sort_by([("shard", "ascending"), ("path", "ascending")])
    shards = entries.column("shard").to_numpy()
    log = manifest_log(store)
    written, start = 0, 0
    while start < len(entries):
        end = min(start + PIECE_ENTRIES, len(entries))
        while end < len(entries) and shards[end] == shards[end - 1]:
            end += 1  # a shard is never split over two pieces
        log.write(piece_name(int(shards[start]), int(shards[end - 1])), entries.slice(start, end - start))
        written += 1
        start = end
    return written
