"""changes module: what changed in an index's embeddings since it was built or last updated.

Every part is stamped when it is indexed: its size, and the `written_at` and `run` of its record in the embed
output's ledger (or in the part's own metadata, where the ledger lacks it; a part without a record, such as a
Parquet file written by other tools, by its mtime or ETag). A sync rewrites a part whose images were deleted
or changed (a new record), deletes a part left empty and writes new, changed and moved images to new parts;
unchanged parts keep their record. So the parts whose stamp differs, and the recorded ones that are gone,
are all an update has to read: within them, image_ids tell the rows that left from those that arrived.
"""
from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.search.embeddings import check_provenance, duplicate_id, list_part_entries, part_provenance
from resnet_batch.schema import STATUS_OK
from resnet_batch.storage import display_path, protocols
from resnet_batch.output.store import OutputStore, part_record

PART_READERS = 16  # parts read at once (footers, image_id columns): object-store latency, not CPU


@dataclass(frozen=True)
class PartNow:
    """One part of the embeddings as they are now, with its stamp."""

    fs: object
    uri: str  # as displayed (index.json "part_uris")
    path: str
    stamp: dict


def part_stamps(uris: Sequence[str], storage_options: Optional[dict] = None) -> list[PartNow]:
    """Every part under `uris`, in index order, stamped (read before the parts: a part rewritten while an index
    reads it then differs from its stamp at the next update, and is read again)."""
    found = []
    for uri in uris:
        fs, entries = list_part_entries(uri, storage_options)
        records = _ledger_records(uri, fs, storage_options)
        missing = [e["name"] for e in entries if posixpath.basename(e["name"]) not in records]
        with ThreadPoolExecutor(PART_READERS) as pool:
            own = dict(zip(missing, pool.map(lambda path: part_record(fs, path), missing)))
        for e in entries:
            record = records.get(posixpath.basename(e["name"])) or own.get(e["name"])
            stamp = {"size": int(e["size"])}
            if record and record.get("written_at") is not None:
                stamp.update(written_at=record["written_at"], run=record.get("run"))
            else:  # not written by the embed job: the file's own version
                stamp["version"] = str(e.get("ETag") or e.get("mtime") or e.get("LastModified"))
            found.append(PartNow(fs, display_path(protocols(fs)[0], e["name"]), e["name"], stamp))
    return found


def _ledger_records(uri: str, fs, storage_options: Optional[dict]) -> dict[str, dict]:
    """Part name -> its latest ledger record, for an embed output folder (none for a single file)."""
    from resnet_batch.output.ledger import read_ledger

    store = OutputStore(uri, dict(storage_options or {}), retry_window_s=30.0)
    if fs.isfile(store.root):
        return {}
    ledger = read_ledger(store).select(["part", "written_at", "run"])
    return {r["part"]: r for r in ledger.to_pylist() if r["part"]}


@dataclass
class Changes:
    """How the embeddings differ from what the index holds: the parts now (in index order), the FAISS ids of the
    rows that left, and per part the image_ids of the rows that arrived."""

    parts: list[PartNow]
    removed: np.ndarray  # FAISS ids
    removed_rows: np.ndarray  # their id-map rows
    added: dict[str, pa.Array] = field(default_factory=dict)  # part uri -> image_ids
    touched: int = 0  # parts new or rewritten since their stamp
    gone: int = 0  # recorded parts that are no more
    before: int = 0  # vectors in the index

    @property
    def added_count(self) -> int:
        return sum(len(a) for a in self.added.values())

    @property
    def kept(self) -> int:
        return self.before - len(self.removed)

    @property
    def after(self) -> int:
        return self.kept + self.added_count

    @property
    def any(self) -> bool:
        return bool(self.touched or self.gone)


def find_changes(uris: Sequence[str], meta: dict, ids: pa.Table, index_uri: str,
                 storage_options: Optional[dict] = None) -> Changes:
    """Compare the parts under `uris` with the stamps index.json recorded; read only the parts whose stamp
    differs (their provenance is checked, then their image_ids); the parts no longer there lose all their rows."""
    now = part_stamps(uris, storage_options)
    recorded = dict(zip(meta["part_uris"], meta["part_stamps"]))
    position = {uri: i for i, uri in enumerate(meta["part_uris"])}
    touched = [p for p in now if recorded.get(p.uri) != p.stamp]
    gone = sorted(set(recorded) - {p.uri for p in now})
    rows_of_part = _rows_by_part(ids.column("part").to_numpy(), len(meta["part_uris"]))
    hint = "; index them with --rebuild (a new index), or another --out"
    with ThreadPoolExecutor(PART_READERS) as pool:
        current = list(pool.map(lambda p: _ok_image_ids(p, meta["provenance"], index_uri, hint), touched))
    image_ids = ids.column("image_id")
    leaving, added = [rows_of_part(position[uri]) for uri in gone], {}
    for part, now_ids in zip(touched, current):
        old_rows = rows_of_part(position[part.uri]) if part.uri in position else np.empty(0, np.int64)
        old_ids = image_ids.take(pa.array(old_rows, pa.int64()))
        leaving.append(old_rows[~pc.is_in(old_ids, value_set=now_ids).to_numpy(zero_copy_only=False)])
        arriving = now_ids.filter(pc.invert(pc.is_in(now_ids, value_set=old_ids)))
        if len(arriving):
            added[part.uri] = arriving
    removed_rows = np.sort(np.concatenate([np.empty(0, np.int64), *leaving]))
    changes = Changes(now, ids.column("id").to_numpy()[removed_rows], removed_rows, added, len(touched), len(gone),
                      len(ids))
    check_unique(changes, ids, meta["part_uris"])
    return changes


def _rows_by_part(part_column: np.ndarray, parts: int):
    """part index -> its id-map rows (one sort of the part column, not a scan per part)."""
    order = np.argsort(part_column, kind="stable")
    bounds = np.searchsorted(part_column[order], np.arange(parts + 1))
    return lambda i: order[bounds[i]:bounds[i + 1]].astype(np.int64)


def _ok_image_ids(part: PartNow, provenance: dict, index_uri: str, hint: str) -> pa.Array:
    """A changed or new part's ok image_ids, after checking it was made like the index's embeddings."""
    with part.fs.open(part.path, "rb") as f:
        pf = pq.ParquetFile(f)
        check_provenance(part_provenance(pf.schema_arrow, part.uri), part.uri, provenance, f"the index {index_uri}",
                         hint)
        table = pf.read(columns=["image_id", "status"])
    return table.filter(pc.equal(table.column("status"), STATUS_OK)).column("image_id").combine_chunks()


def check_unique(changes: Changes, ids: pa.Table, part_uris: list[str]) -> None:
    """Refuse an arriving image_id that is already indexed (and stays) or arrives twice, as a build would."""
    if not changes.added:
        return
    arriving = pa.chunked_array(list(changes.added.values()), pa.string())
    owner = [uri for uri, a in changes.added.items() for _ in range(len(a))]
    keep = np.ones(len(ids), dtype=bool)
    keep[changes.removed_rows] = False
    staying = ids.filter(pa.array(keep))
    clash = pc.is_in(staying.column("image_id"), value_set=arriving)
    if pc.any(clash).as_py():
        row = staying.filter(clash).slice(0, 1).to_pylist()[0]
        duplicate_id(row["image_id"], part_uris[row["part"]], owner[arriving.to_pylist().index(row["image_id"])])
    if pc.count_distinct(arriving).as_py() < len(arriving):
        seen: dict[str, str] = {}
        for image_id, uri in zip(arriving.to_pylist(), owner):
            if image_id in seen:
                duplicate_id(image_id, seen[image_id], uri)
            seen[image_id] = uri
