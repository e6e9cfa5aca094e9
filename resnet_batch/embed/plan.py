"""plan module: what a run has to do.

A new output: the listing streams straight into shards (`StreamPlanner`, a thread), each stored in the
manifest before the pipeline gets it. An existing output (every rerun is a sync): the listing is compared
with the manifest (`diff`): new and changed images are embedded into new shards, images whose bytes an
object store says were already embedded under another name (same size and ETag: a move or a copy) are
copied from their rows, deleted and changed ones leave their parts, unchanged ones are not touched.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.config import InputConfig
from resnet_batch.errors import InputError
from resnet_batch.embed.listing import (DETECT_ENTRIES, ENTRY_SCHEMA, FORMATS, InputListing, Shard, ShardCutter, Skipped,
                                  detect_format, extension, from_raw, hidden, shard_of)
from resnet_batch.output.manifest import MANIFEST_SCHEMA, ManifestWriter
from resnet_batch.output.store import OutputStore


def detect(cfg: InputConfig, listing: InputListing) -> tuple[str, Iterator[pa.Table]]:
    """The input's format (input.format, or auto from the first DETECT_ENTRIES entries that are not hidden)
    and the pages again, the ones looked at first included."""
    pages = listing.pages
    if cfg.format != "auto":
        return cfg.format, pages
    seen: list[pa.Table] = []
    names: list[str] = []
    for page in pages:
        seen.append(page)
        names.extend(r for r in (from_raw(p) for p in page.column("path").to_pylist()) if not hidden(r))
        if len(names) >= DETECT_ENTRIES:
            break
    fmt = detect_format(names, cfg.extensions)

    def again() -> Iterator[pa.Table]:
        yield from seen
        yield from pages

    return fmt, again()


def input_layout(cfg: InputConfig, fmt: str) -> dict:
    """The input settings that shape this format's shards and columns (a rerun must keep them)."""
    keys = FORMATS[fmt].layout_keys
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.model_dump(include=set(keys)).items()}


# -- a new output: streaming ---------------------------------------------------------------------


class StreamPlanner:
    """Lists, cuts, stores and hands over shards in a thread while the scheduler already runs them."""

    def __init__(self, cfg: InputConfig, fmt: str, root: str, pages: Iterator[pa.Table], store: OutputStore,
                 release: Callable[[list[Shard]], None], close: Callable[[], None], next_shard: int = 0):
        self.pages, self.close = pages, close
        self.expected: dict[int, int] = {}  # shard -> manifest entries (files of a folder shard)
        self.listed = 0
        self.images = 0
        self.shards = 0
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self.seconds = 0.0
        self.manifest = ManifestWriter(store, release)
        self.cutter = ShardCutter(cfg, fmt, root, next_shard, self._on_shard)
        self.thread = threading.Thread(target=self._run, name="plan", daemon=True)

    @property
    def skipped(self) -> Skipped:
        return self.cutter.skipped

    @property
    def next_shard(self) -> int:
        return self.cutter.next_index

    def start(self) -> "StreamPlanner":
        self.thread.start()
        return self

    def _on_shard(self, shard: Shard, entries: pa.Table) -> None:
        self.expected[shard.index] = len(entries)
        self.images += len(entries)
        self.shards += 1
        self.manifest.add(shard, entries)

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            for page in self.pages:
                self.listed += len(page)
                self.cutter.add(page)
                if self.cutter.stopped:
                    break
            self.cutter.finish()
            self.manifest.flush()
        except BaseException as err:  # handed to the runner, which stops the run
            self.error = err
        finally:
            self.seconds = time.perf_counter() - t0
            self.done.set()
            self.close()


# -- an existing output: sync ------------------------------------------------------------------------


@dataclass
class SyncPlan:
    """The difference between the input now and what the output holds, as work."""

    new_entries: pa.Table  # MANIFEST_SCHEMA: entries of the new shards (copies and embeddings)
    drops: pa.Table  # (shard, path): manifest entries leaving their shard (deleted or changed)
    copies: pa.Table  # (shard, path, old_shard, old_path): rows copied from an earlier part (moves, copies)
    next_shard: int
    counts: dict = field(default_factory=dict)  # listed, unchanged, new, changed, deleted, reused

    def touches_output(self) -> bool:
        return bool(len(self.new_entries) or len(self.drops))


COPIES_SCHEMA = pa.schema([pa.field("shard", pa.int64()), pa.field("path", pa.binary()),
                           pa.field("old_shard", pa.int64()), pa.field("old_path", pa.binary())])
DROPS_SCHEMA = pa.schema([pa.field("shard", pa.int64()), pa.field("path", pa.binary())])


def select(cfg: InputConfig, fmt: str, pages: Iterator[pa.Table]) -> tuple[pa.Table, Skipped]:
    """The whole listing: the entries this format takes (not hidden, wanted extension; input.limit applied)
    and the skipped ones."""
    wanted = FORMATS[fmt].wanted(cfg)
    skipped = Skipped()
    tables = []
    n = 0
    for page in pages:
        rels = [from_raw(p) for p in page.column("path").to_pylist()]
        keep = np.array([not hidden(r) and extension(r) in wanted for r in rels], dtype=bool)
        skipped.add([r for r, k in zip(rels, keep) if not k])
        table = page.filter(pa.array(keep))
        if cfg.limit is not None and fmt == "folder":
            table = table.slice(0, max(0, cfg.limit - n))
        tables.append(table)
        n += len(table)
        if cfg.limit is not None and fmt == "folder" and n >= cfg.limit:
            break
    return (pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()), skipped


def _same_version(a_size, a_mtime, a_etag, b_size, b_mtime, b_etag) -> pa.ChunkedArray:
    """Equal size and equal version: the ETag where both sides have one, else the mtime."""
    etags = pc.and_(pc.is_valid(a_etag), pc.is_valid(b_etag))
    version = pc.if_else(etags, pc.equal(a_etag, b_etag), pc.equal(a_mtime, b_mtime))
    return pc.fill_null(pc.and_(pc.equal(a_size, b_size), version), False)


def compare(current: pa.Table, old: pa.Table) -> tuple[pa.Table, tuple]:
    """The listing (ENTRY_SCHEMA) joined with manifest rows on the path (the old side's columns end in `_old`),
    and the masks over the joined rows: (unchanged, changed, deleted, added)."""
    now = current.append_column("_new", pa.array(np.ones(len(current), bool)))
    was = old.append_column("_old", pa.array(np.ones(len(old), bool)))
    j = now.join(was, keys="path", join_type="full outer", right_suffix="_old", coalesce_keys=True)
    in_new, in_old = pc.fill_null(j.column("_new"), False), pc.fill_null(j.column("_old"), False)
    both = pc.and_(in_new, in_old)
    same = _same_version(j.column("size"), j.column("mtime_ns"), j.column("etag"),
                         j.column("size_old"), j.column("mtime_ns_old"), j.column("etag_old"))
    return j, (pc.and_(both, same), pc.and_(both, pc.invert(same)), pc.and_(in_old, pc.invert(in_new)),
               pc.and_(in_new, pc.invert(in_old)))


def diff(cfg: InputConfig, fmt: str, root: str, current: pa.Table, manifest: pa.Table, done: set[int],
         next_shard: int, on_shard: Callable[[Shard, pa.Table], None] = lambda s, e: None) -> SyncPlan:
    """Compare the listing (`current`, ENTRY_SCHEMA) with the manifest; `done` are the shards whose parts are
    all written (only their rows can be copied). New shards get indices from `next_shard` on."""
    j, (unchanged, changed, deleted, added) = compare(current, manifest)
    drops = j.filter(pc.or_(changed, deleted)).select(["shard", "path"]).cast(DROPS_SCHEMA)

    # Moves and copies: a new object whose size and ETag equal those of an embedded one (object stores only).
    fresh = j.filter(pc.or_(added, changed)).select(["path", "size", "mtime_ns", "etag"])
    copies = COPIES_SCHEMA.empty_table()
    if len(manifest) and pc.any(pc.is_valid(fresh.column("etag"))).as_py():
        donors = manifest.filter(pc.and_(pc.is_in(manifest.column("shard"), pa.array(sorted(done), pa.int64())),
                                         pc.is_valid(manifest.column("etag"))))
        donors = donors.select(["path", "size", "etag", "shard"]).rename_columns(
            ["old_path", "size", "etag", "old_shard"])
        matched = fresh.filter(pc.is_valid(fresh.column("etag"))).join(donors, keys=["size", "etag"],
                                                                        join_type="inner")
        if len(matched):
            matched = matched.sort_by([("path", "ascending"), ("old_shard", "ascending"), ("old_path", "ascending")])
            paths = matched.column("path").to_pylist()
            first = np.array([i == 0 or paths[i] != paths[i - 1] for i in range(len(paths))])
            matched = matched.filter(pa.array(first))
            reused = pc.is_in(fresh.column("path"), matched.column("path"))
            copied_entries, fresh = fresh.filter(reused), fresh.filter(pc.invert(reused))
            copies, next_shard, copy_manifest = _copy_shards(cfg, fmt, matched, copied_entries, next_shard)
        else:
            copy_manifest = MANIFEST_SCHEMA.empty_table()
    else:
        copy_manifest = MANIFEST_SCHEMA.empty_table()

    new_tables = [copy_manifest]
    cutter = ShardCutter(cfg, fmt, root, next_shard, lambda shard, entries: (
        new_tables.append(entries.append_column("shard", pa.array([shard.index] * len(entries), pa.int64()))),
        on_shard(shard, entries)))
    cutter.add(fresh.cast(ENTRY_SCHEMA))
    cutter.finish()
    counts = {"listed": len(current), "unchanged": _count(unchanged), "new": _count(added) - len(copies),
              "changed": _count(changed), "deleted": _count(deleted), "reused": len(copies)}
    return SyncPlan(pa.concat_tables([t.cast(MANIFEST_SCHEMA) for t in new_tables]), drops, copies,
                    cutter.next_index, counts)


def _count(mask) -> int:
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


def _copy_shards(cfg: InputConfig, fmt: str, matched: pa.Table, entries: pa.Table, next_shard: int):
    """New shards for copied rows: folder entries in groups of images_per_shard, a container file each."""
    per = cfg.images_per_shard if fmt == "folder" else 1
    order = pc.sort_indices(matched, [("path", "ascending")])
    matched = matched.take(order)
    shard_of_row = next_shard + np.arange(len(matched)) // per
    copies = pa.table({"shard": pa.array(shard_of_row, pa.int64()), "path": matched.column("path"),
                       "old_shard": matched.column("old_shard"), "old_path": matched.column("old_path")},
                      schema=COPIES_SCHEMA)
    by_path = dict(zip(matched.column("path").to_pylist(), shard_of_row.tolist()))
    entries = entries.sort_by([("path", "ascending")])
    shards = pa.array([by_path[p] for p in entries.column("path").to_pylist()], pa.int64())
    manifest = entries.cast(ENTRY_SCHEMA).append_column("shard", shards)
    return copies, int(shard_of_row[-1]) + 1 if len(matched) else next_shard, manifest


# -- what is done --------------------------------------------------------------------------------


def complete_shards(ledger: pa.Table) -> tuple[set[int], dict[int, dict]]:
    """Shards whose every chunk has a record (a folder shard: its one part; a tar/Parquet shard: chunks
    0..n-1, n from the record of its last chunk), and per shard the summed counts."""
    by_shard: dict[int, dict] = {}
    for r in ledger.select(["shard", "chunk", "chunks", "rows", "ok", "failed", "skipped"]).to_pylist():
        s = by_shard.setdefault(r["shard"], {"chunks": set(), "n": None, "rows": 0, "ok": 0, "failed": 0,
                                             "skipped": 0})
        s["chunks"].add(r["chunk"])
        if r["chunks"] is not None and r["chunks"] > 0:
            s["n"] = r["chunks"]
        for k in ("rows", "ok", "failed", "skipped"):
            s[k] += r[k] or 0
    done = set()
    for shard, s in by_shard.items():
        if s["chunks"] == {-1} or (s["n"] is not None and s["chunks"] >= set(range(s["n"]))):
            done.add(shard)
    return done, by_shard


def pending_entries(manifest: pa.Table, done: set[int]) -> pa.Table:
    """The manifest's entries whose shards are not done, in shard order (compact Arrow, not Python objects)."""
    if not len(manifest):
        return manifest
    pending = manifest.filter(pc.invert(pc.is_in(manifest.column("shard"), pa.array(sorted(done), pa.int64()))))
    return pending.sort_by([("shard", "ascending"), ("path", "ascending")])


def todo_shards(fmt: str, root: str, pending: pa.Table) -> Iterator[Shard]:
    """The Shard of each run of equal shard indices in `pending` (pending_entries), made one at a time, so
    a resumed run over millions of images never holds them all as Python objects."""
    if not len(pending):
        return
    kind = FORMATS[fmt].shard_kind
    col = pending.column("shard").to_numpy()
    bounds = np.flatnonzero(np.diff(col)) + 1
    for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(pending)]):
        yield shard_of(int(col[start]), kind, root, pending.slice(int(start), int(end - start)))


def expected_counts(manifest: pa.Table) -> dict[int, int]:
    """shard -> its manifest entries."""
    if not len(manifest):
        return {}
    g = manifest.group_by("shard").aggregate([("path", "count")])
    return dict(zip(g.column("shard").to_pylist(), g.column("path_count").to_pylist()))


def no_input(cfg: InputConfig, fmt: str, listed: int) -> InputError:
    wanted = sorted(FORMATS[fmt].wanted(cfg))
    return InputError(f"no {fmt} input found under {cfg.uri}: {listed} files listed, none with extension "
                      f"{wanted} (input.extensions / input.format)")
