"""manifest module: an output's plan as Parquet pieces: every input object (path, size, mtime_ns or etag) and
the shard it belongs to. Written piece by piece while the listing runs (a shard is handed to the pipeline
only once its piece is stored), read in one go by the next run to resume or sync."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.output.store import MANIFEST_DIR, OutputStore, read_parquet
from resnet_batch.schema import ENTRY_SCHEMA

MANIFEST_SCHEMA = pa.schema(list(ENTRY_SCHEMA) + [pa.field("shard", pa.int64(), nullable=False)])
PIECE_ENTRIES = 100_000  # entries per piece at most
FLUSH_S = 2.0  # a piece is written at least this often while shards wait for it
READERS = 16  # pieces read at once


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


def encode_piece(table: pa.Table) -> bytes:
    """A piece's bytes: paths delta-encoded (sorted paths share prefixes), zstd; ~20-30 B per entry."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.cast(MANIFEST_SCHEMA), sink, compression="zstd", use_dictionary=["etag"],
                   column_encoding={"path": "DELTA_BYTE_ARRAY", "size": "DELTA_BINARY_PACKED",
                                    "mtime_ns": "DELTA_BINARY_PACKED", "shard": "DELTA_BINARY_PACKED"},
                   write_statistics=False)
    return sink.getvalue().to_pybytes()


class ManifestWriter:
    """Buffers shards with their entries and stores them as pieces; `release(shards)` is called with the
    shards of each piece once it is stored (so no part is ever written for a shard the manifest lacks)."""

    def __init__(self, store: OutputStore, release: Callable[[list[Shard]], None],
                 piece_entries: int = PIECE_ENTRIES, flush_s: float = FLUSH_S):
        self.store, self.release = store, release
        self.piece_entries, self.flush_s = piece_entries, flush_s
        self.shards: list[Shard] = []
        self.tables: list[pa.Table] = []
        self.rows = 0
        self.last_flush = time.monotonic()
        self.pieces = 0
        self.bytes = 0

    def add(self, shard: Shard, entries: pa.Table) -> None:
        self.shards.append(shard)
        self.tables.append(entries.append_column("shard", pa.array([shard.index] * len(entries), pa.int64())))
        self.rows += len(entries)
        if self.rows >= self.piece_entries or time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if not self.shards:
            return
        data = encode_piece(pa.concat_tables(self.tables))
        self.store.write_bytes(f"{MANIFEST_DIR}/{piece_name(self.shards[0].index, self.shards[-1].index)}", data)
        self.pieces += 1
        self.bytes += len(data)
        shards = self.shards
        self.shards, self.tables, self.rows = [], [], 0
        self.last_flush = time.monotonic()
        self.release(shards)


def read_manifest(store: OutputStore) -> pa.Table:
    """Every entry of the manifest (all pieces, read concurrently)."""
    names = [n for n in store.list_dir(MANIFEST_DIR) if piece_range(n)]
    if not names:
        return MANIFEST_SCHEMA.empty_table()
    with ThreadPoolExecutor(READERS) as pool:
        tables = list(pool.map(lambda n: read_parquet(store.fs, store.path(f"{MANIFEST_DIR}/{n}")), names))
    return pa.concat_tables([t.cast(MANIFEST_SCHEMA) for t in tables])


def drop_entries(store: OutputStore, drops: pa.Table) -> int:
    """Rewrite the pieces holding these (shard, path) entries without them (a piece left empty is deleted).
    Idempotent: a piece that no longer holds them is rewritten unchanged or left alone. Returns pieces touched."""
    if not len(drops):
        return 0
    shards = set(drops.column("shard").to_pylist())
    touched = 0
    for name in store.list_dir(MANIFEST_DIR):
        rng = piece_range(name)
        if rng is None or not any(rng[0] <= s <= rng[1] for s in shards):
            continue
        path = f"{MANIFEST_DIR}/{name}"
        piece = read_parquet(store.fs, store.path(path)).cast(MANIFEST_SCHEMA)
        key = pc.binary_join_element_wise(pc.cast(piece.column("shard"), pa.string()).cast(pa.binary()),
                                          piece.column("path"), b"\x00")
        gone = pc.binary_join_element_wise(pc.cast(drops.column("shard"), pa.string()).cast(pa.binary()),
                                           drops.column("path"), b"\x00")
        keep = pc.invert(pc.is_in(key, value_set=gone))
        if pc.all(keep).as_py():
            continue
        kept = piece.filter(keep)
        if len(kept):
            store.write_bytes(path, encode_piece(kept))
        else:
            store.remove(path)
        touched += 1
    return touched


def write_entries(store: OutputStore, entries: pa.Table) -> int:
    """Store entries (MANIFEST_SCHEMA, any shards) as pieces of whole shards; returns pieces written."""
    if not len(entries):
        return 0
    entries = entries.cast(MANIFEST_SCHEMA).sort_by([("shard", "ascending"), ("path", "ascending")])
    shards = entries.column("shard").to_numpy()
    pieces, start = 0, 0
    while start < len(entries):
        end = min(start + PIECE_ENTRIES, len(entries))
        while end < len(entries) and shards[end] == shards[end - 1]:
            end += 1  # a shard is never split over two pieces
        piece = entries.slice(start, end - start)
        store.write_bytes(f"{MANIFEST_DIR}/{piece_name(int(shards[start]), int(shards[end - 1]))}",
                          encode_piece(piece))
        pieces += 1
        start = end
    return pieces
