"""ledger module: one small record per finished chunk (its part, rows, ok, failed, seconds, who wrote it),
appended by the driver as the actors report, in Parquet pieces, and read in one go by the next run, the
status command and the index. A part whose record was lost with a killed driver is recovered from its own
metadata (one footer read, for those parts only)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.errors import OutputError
from resnet_batch.output.pieces import READ_THREADS, PieceLog
from resnet_batch.output.store import LEDGER_DIR, OutputStore, part_record
from resnet_batch.provenance import check_compatible
from resnet_batch.schema import PART_RECORD_SCHEMA

LEDGER_FLUSH_RECORDS = 1000
LEDGER_FLUSH_S = 10.0
COMPACT_PIECES = 32  # more pieces than this are merged into one at the end of a run


def records_table(records: Iterable[dict]) -> pa.Table:
    """Records (dicts with the PART_RECORD_SCHEMA fields) as a table; missing fields are null."""
    names = PART_RECORD_SCHEMA.names
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in records], schema=PART_RECORD_SCHEMA)


def ledger_log(store: OutputStore) -> PieceLog:
    """The ledger's piece log: `_ledger/l-RRRR-NNNNNN.parquet` (run, sequence) and `l-RRRR-compact.parquet`."""
    return PieceLog(store, LEDGER_DIR, PART_RECORD_SCHEMA, lambda n: n.startswith("l-") and n.endswith(".parquet"),
                    compression="zstd")


class LedgerWriter:
    """Appends records in pieces `_ledger/l-RRRR-NNNNNN.parquet` (every LEDGER_FLUSH_RECORDS or LEDGER_FLUSH_S)."""

    def __init__(self, store: OutputStore, run: int):
        self.log, self.run = ledger_log(store), run
        self.buffer: list[dict] = []
        self.seq = len([n for n in store.list_dir(LEDGER_DIR) if n.startswith(f"l-{run:04d}-")])
        self.last = time.monotonic()

    def add(self, record: dict) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= LEDGER_FLUSH_RECORDS or time.monotonic() - self.last >= LEDGER_FLUSH_S:
            self.flush()

    def tick(self) -> None:
        """Flush when records have waited LEDGER_FLUSH_S (called from the driver's loop)."""
        if self.buffer and time.monotonic() - self.last >= LEDGER_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.buffer:
            return
        self.log.write(f"l-{self.run:04d}-{self.seq:06d}.parquet", records_table(self.buffer))
        self.seq += 1
        self.buffer = []


def read_ledger(store: OutputStore) -> pa.Table:
    """The latest record of every (shard, chunk) ever written to this output (read concurrently)."""
    return latest(ledger_log(store).read())


def latest(table: pa.Table) -> pa.Table:
    """One row per (shard, chunk): the one written last."""
    if not len(table):
        return table
    table = table.sort_by([("shard", "ascending"), ("chunk", "ascending"), ("written_at", "descending")])
    s, c = table.column("shard").to_numpy(), table.column("chunk").to_numpy()
    first = np.ones(len(table), dtype=bool)
    first[1:] = (s[1:] != s[:-1]) | (c[1:] != c[:-1])
    return table.filter(pa.array(first))


def recover(store: OutputStore, part_names: list[str], provenance: Optional[dict] = None) -> list[dict]:
    """Records of parts that have none in the ledger, read from the parts' own metadata. A part without it
    (not written by this job), or made with another setup than `provenance`, raises OutputError naming the
    file and the way out."""
    def one(name: str) -> dict:
        try:
            record, theirs = part_record(store.fs, store.path(name), with_provenance=True)
        except Exception as err:
            raise OutputError(f"{store.display(name)} is not a readable Parquet part ({type(err).__name__}: {err}); "
                              f"move it out of the output folder, or rerun with --fresh to start over") from None
        if record is None:
            raise OutputError(f"{store.display(name)} was not written by resnet-batch (no part record in its "
                              "metadata); move it out of the output folder, or use another output.uri")
        if provenance is not None:
            check_compatible(theirs or {}, provenance, f"{store.display(name)} was made with another setup",
                             hint="; move it out of the output folder, or rerun with --fresh", error=OutputError)
        return record

    if not part_names:
        return []
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(one, part_names))


def compact(store: OutputStore, run: int, table: Optional[pa.Table] = None) -> None:
    """Merge the ledger's pieces into one when there are many (the merged piece first, then the old ones go)."""
    log = ledger_log(store)
    names = log.names()
    if len(names) <= COMPACT_PIECES:
        return
    table = read_ledger(store) if table is None else table
    merged = f"l-{run:04d}-compact.parquet"
    log.write(merged, table)
    for n in names:
        if n != merged:
            log.remove(n)


def totals(table: pa.Table) -> dict:
    """Sums of rows / ok / failed / skipped over a ledger table."""
    return {k: int(pc.sum(table.column(k)).as_py() or 0) for k in ("rows", "ok", "failed", "skipped")}
