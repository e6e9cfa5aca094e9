"""syncdiff module: the sync diff as a partitioned merge, so the driver never holds the library.

The listing and the manifest are split by a hash of the path into `partitions` (the number from the size),
each partition is compared in its own task (new / changed / deleted / unchanged, exactly as `plan.diff` does
for the whole), and moves or copies are found within a partition of (size, ETag) instead of a join against
every row. New shards are numbered from per-unit counts and each unit writes its plan pieces under `_sync/`
itself; the driver sees counts, one record per partition and per plan piece, never rows.

With one partition (a night up to ROWS_PER_PARTITION entries) the same steps run in this process: a small
night needs no Ray at all. The steps are plain functions on Arrow tables; `Steps` runs them as Ray tasks or
in place.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resnet_batch.config import InputConfig
from resnet_batch.embed.listing import (ENTRY_SCHEMA, FORMATS, SKIPPED_EXAMPLES, Skipped, extension, from_raw,
                                        hidden, storable)
from resnet_batch.embed.plan import COPIES_SCHEMA, DROPS_SCHEMA, _count, compare
from resnet_batch.output.manifest import MANIFEST_SCHEMA, PIECE_ENCODING, PIECE_ENTRIES, piece_name, piece_range
from resnet_batch.output.manifest import drop_from_piece, manifest_log
from resnet_batch.output.pieces import PieceLog
from resnet_batch.output.store import MANIFEST_DIR, SYNC_DIR, OutputStore, read_parquet

ROWS_PER_PARTITION = 1_000_000  # entries a diff task holds at most (listing + manifest ~ 200 B each)
MAP_ROWS = 500_000  # listing entries the driver batches before a task splits them (driver-fed listings)
MAX_PARTITIONS = 4096
MIN_RAY_PARTITIONS = 8  # once in Ray, at least this many (the listing's size is unknown until it ends)
DIFF_CPUS = 1.0
_MATCH_SCHEMA = pa.schema([("path", pa.binary()), ("old_shard", pa.int64()), ("old_path", pa.binary())])
_DONOR_SCHEMA = pa.schema([pa.field("old_path", pa.binary()), pa.field("size", pa.int64()),
                           pa.field("etag", pa.binary()), pa.field("old_shard", pa.int64())])


def partitions_for(rows: int, per: Optional[int] = None) -> int:
    """Partitions for a night of about `rows` entries: a power of two, each partition at most `per` rows
    (ROWS_PER_PARTITION)."""
    need = max(1, math.ceil(rows / max(per or ROWS_PER_PARTITION, 1)))
    return min(MAX_PARTITIONS, 1 << (need - 1).bit_length())


def _hash(values: pa.Array) -> np.ndarray:
    """A stable 64-bit hash of binary values (the same in every process, unlike Python's hash())."""
    import pandas as pd

    return pd.util.hash_array(values.to_numpy(zero_copy_only=False), categorize=False)


def path_partition(paths: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    if isinstance(paths, pa.ChunkedArray):
        paths = paths.combine_chunks()
    if partitions == 1:
        return np.zeros(len(paths), dtype=np.int64)
    return (_hash(paths) % np.uint64(partitions)).astype(np.int64)


def version_partition(sizes, etags, partitions: int) -> np.ndarray:
    """The (size, ETag) partition of each row: a move or copy is found only among rows of equal both."""
    if isinstance(etags, pa.ChunkedArray):
        etags, sizes = etags.combine_chunks(), sizes.combine_chunks()
    if partitions == 1:
        return np.zeros(len(etags), dtype=np.int64)
    h = _hash(etags) ^ (sizes.to_numpy(zero_copy_only=False).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return (h % np.uint64(partitions)).astype(np.int64)


def folder_partition(paths, partitions: int) -> np.ndarray:
    """The partition of each path's folder: new shards are cut per folder partition, in path order, so the
    photos of one folder (an album, a day) share a few parts, and deleting them later touches those only."""
    if isinstance(paths, pa.ChunkedArray):
        paths = paths.combine_chunks()
    if partitions == 1 or not len(paths):
        return np.zeros(len(paths), dtype=np.int64)
    folders = pa.array([p.rpartition(b"/")[0] for p in paths.to_pylist()], pa.binary())
    return (_hash(folders) % np.uint64(partitions)).astype(np.int64)


def split(table: pa.Table, which: np.ndarray, partitions: int) -> list[pa.Table]:
    """`table` cut into `partitions` tables by the partition number of each row."""
    if partitions == 1:
        return [table]
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(partitions + 1))
    sorted_ = table.take(pa.array(order))
    return [sorted_.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(partitions)]


# -- the settings every step gets -------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffSettings:
    """What a diff step needs: the input's selection rules, the output to read and write, the sizes."""

    input: InputConfig
    fmt: str
    root: str
    output_uri: str
    output_options: dict
    retry_window_s: float
    run: int
    partitions: int
    move_partitions: int

    def store(self) -> OutputStore:
        return OutputStore(self.output_uri, dict(self.output_options), self.retry_window_s)

    @property
    def per_shard(self) -> int:
        return self.input.images_per_shard if self.fmt == "folder" else 1


def _fetch(items: list) -> list:
    """Tables handed to a step: resolved from the object store in a Ray task, as they are in place."""
    import ray

    refs = [i for i in items if isinstance(i, ray.ObjectRef)]
    if not refs:
        return list(items)
    got = iter(ray.get(refs))
    return [next(got) if isinstance(i, ray.ObjectRef) else i for i in items]


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = [t for t in tables if t is not None and len(t)]
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


# -- step 1: split the listing and the manifest by path ------------------------------------------------


def select_entries(cfg: InputConfig, fmt: str, page: pa.Table) -> tuple[pa.Table, int, list[str]]:
    """The entries of a page this format takes (not hidden, a wanted extension), and the skipped ones:
    their count and the first SKIPPED_EXAMPLES as examples."""
    wanted = FORMATS[fmt].wanted(cfg)
    rels = [from_raw(p) for p in page.column("path").to_pylist()]
    keep = np.array([not hidden(r) and extension(r) in wanted for r in rels], dtype=bool)
    skipped = [storable(r) for r, k in zip(rels, keep) if not k]
    return page.filter(pa.array(keep, pa.bool_())), len(skipped), skipped[:SKIPPED_EXAMPLES]


def split_listing(s: DiffSettings, pages, selected: bool = False) -> tuple:
    """A batch of listing pages (a table, or a callable yielding pages: an inventory file, a listing task)
    -> (info, partition 0, ..., partition P-1). info: listed (entries selected), skipped, examples."""
    info = {"listed": 0, "skipped": 0, "examples": []}
    if isinstance(pages, _Selected):
        info.update(skipped=pages.skipped, examples=list(pages.examples))
        source, selected = [pages.table], True
    else:
        source = [pages] if isinstance(pages, pa.Table) else pages()
    parts: list[list[pa.Table]] = [[] for _ in range(s.partitions)]
    for page in source:
        page = page.cast(ENTRY_SCHEMA)
        if not selected:
            page, n, examples = select_entries(s.input, s.fmt, page)
            info["skipped"] += n
            room = SKIPPED_EXAMPLES - len(info["examples"])
            info["examples"] += examples[:max(room, 0)]
        info["listed"] += len(page)
        for p, t in enumerate(split(page, path_partition(page.column("path"), s.partitions), s.partitions)):
            if len(t):
                parts[p].append(t)
    return (info, *[_concat(t, ENTRY_SCHEMA) for t in parts])


def split_manifest(s: DiffSettings, names: list[str]) -> tuple:
    """Manifest pieces -> (their shard counts, partition 0, ..., partition P-1)."""
    store = s.store()
    parts: list[list[pa.Table]] = [[] for _ in range(s.partitions)]
    counts: dict[int, int] = {}
    for name in names:
        piece = manifest_log(store).read_one(name)
        counts.update(_shard_counts(piece))
        for p, t in enumerate(split(piece, path_partition(piece.column("path"), s.partitions), s.partitions)):
            if len(t):
                parts[p].append(t)
    return (counts, *[_concat(t, MANIFEST_SCHEMA) for t in parts])


def _shard_counts(table: pa.Table) -> dict[int, int]:
    if not len(table):
        return {}
    g = table.group_by("shard").aggregate([("path", "count")])
    return dict(zip(g.column("shard").to_pylist(), g.column("path_count").to_pylist()))


# -- step 2: one partition's diff ------------------------------------------------------------------------


def diff_partition(s: DiffSettings, index: int, listing: list, manifest: list, done, starts=None) -> tuple:
    """One path partition: listing rows against manifest rows. Returns (summary, fresh rows without an ETag
    per folder partition..., fresh rows per (size, ETag) partition..., donors per (size, ETag) partition...,
    drops per shard group...). Fresh: new or changed entries; donors: manifest rows of complete shards that
    carry an ETag; drops: (shard, path) of deleted and changed entries, split by `starts` (shard_groups)."""
    starts = _fetch([starts])[0] if starts is not None else np.zeros(1, np.int64)
    current = _concat(_fetch(listing), ENTRY_SCHEMA)
    old = _concat(_fetch(manifest), MANIFEST_SCHEMA)
    done = _fetch([done])[0]
    j, (unchanged, changed, deleted, added) = compare(current, old)
    drops = j.filter(pc.or_(changed, deleted)).select(["shard", "path"]).cast(DROPS_SCHEMA)
    drop_groups = split(drops, shard_group(drops.column("shard"), starts), len(starts))
    fresh = j.filter(pc.or_(added, changed)).select(["path", "size", "mtime_ns", "etag"]).cast(ENTRY_SCHEMA)
    with_etag = pc.is_valid(fresh.column("etag"))
    plain = fresh.filter(pc.invert(with_etag))
    fresh = fresh.filter(with_etag)
    q = s.move_partitions
    donors = _DONOR_SCHEMA.empty_table()
    if len(old):
        keep = pc.and_(pc.is_in(old.column("shard"), value_set=done), pc.is_valid(old.column("etag")))
        donors = old.filter(keep).select(["path", "size", "etag", "shard"]).rename_columns(_DONOR_SCHEMA.names)
    plains = split(plain, folder_partition(plain.column("path"), s.partitions), s.partitions)
    summary = {"listed": len(current), "unchanged": _count(unchanged), "changed": _count(changed),
               "deleted": _count(deleted), "added": _count(added), "drops": len(drops),
               "plain": [len(t) for t in plains], "drop_shards": _shard_counts(drops),
               "drop_groups": [len(t) for t in drop_groups]}
    return (summary, *plains,
            *split(fresh, version_partition(fresh.column("size"), fresh.column("etag"), q), q),
            *split(donors, version_partition(donors.column("size"), donors.column("etag"), q), q),
            *drop_groups)


# -- the drops, by shard group ------------------------------------------------------------------------------


def shard_groups(pieces: list[tuple[str, int]], groups: int) -> np.ndarray:
    """The first shard of each of about `groups` shard ranges of about equal entries, each made of whole
    manifest pieces (pieces whose ranges overlap stay together): the drops of one range touch parts and
    manifest pieces that no other range touches, so each range is applied by its own task, in parallel,
    without the driver ever holding the drops (sync.apply)."""
    spans: list[list[int]] = []
    for first, last, n in sorted((r[0], r[1], n) for name, n in pieces if (r := piece_range(name))):
        if spans and first <= spans[-1][1]:
            spans[-1][1], spans[-1][2] = max(spans[-1][1], last), spans[-1][2] + n
        else:
            spans.append([first, last, n])
    per = sum(x[2] for x in spans) / max(groups, 1)
    starts, rows = [0], 0
    for first, _, n in spans:
        if rows >= per and first > starts[-1]:
            starts.append(first)
            rows = 0
        rows += n
    return np.array(starts, np.int64)


def shard_group(shards, starts: np.ndarray) -> np.ndarray:
    if isinstance(shards, pa.ChunkedArray):
        shards = shards.combine_chunks()
    values = shards.to_numpy(zero_copy_only=False)
    return np.maximum(np.searchsorted(starts, values, side="right") - 1, 0).astype(np.int64)


def drops_piece_name(run: int, group: int) -> str:
    """A plan's drops of one shard group (`-g`: the groups' ranges never overlap; see shard_groups)."""
    return f"drops-{run:04d}-g{group:05d}.parquet"


def write_drops(s: DiffSettings, group: int, tables: list) -> int:
    """One shard group's drops from every path partition, as one plan piece in (shard, path) order."""
    drops = _concat(_fetch(tables), DROPS_SCHEMA).sort_by([("shard", "ascending"), ("path", "ascending")])
    if len(drops):
        _write(s.store(), f"{SYNC_DIR}/{drops_piece_name(s.run, group)}", drops)
    return len(drops)


# -- step 3: moves and copies within a (size, ETag) partition ----------------------------------------------


def match_moves(s: DiffSettings, fresh: list, donors: list) -> tuple:
    """Fresh entries whose size and ETag equal those of an embedded row become copies of it (the row of the
    lowest shard, then the lowest path, when several match). Returns (summary, then per folder partition:
    copies (path, old_shard, old_path)..., their entries..., the other fresh entries...)."""
    fresh = _concat(_fetch(fresh), ENTRY_SCHEMA)
    donors = _concat(_fetch(donors), _DONOR_SCHEMA)
    matched = _MATCH_SCHEMA.empty_table()
    if len(fresh) and len(donors):
        m = fresh.select(["path", "size", "etag"]).join(donors, keys=["size", "etag"], join_type="inner")
        if len(m):
            m = m.sort_by([("path", "ascending"), ("old_shard", "ascending"), ("old_path", "ascending")])
            paths = m.column("path").combine_chunks()
            first = np.ones(len(m), dtype=bool)
            if len(m) > 1:
                first[1:] = pc.not_equal(paths.slice(1), paths.slice(0, len(m) - 1)).to_numpy(zero_copy_only=False)
            matched = m.filter(pa.array(first)).select(["path", "old_shard", "old_path"])
    reused = pc.is_in(fresh.column("path"), matched.column("path"))
    copied = fresh.filter(reused)
    rest = fresh.filter(pc.invert(reused))
    r = s.partitions
    matched = split(matched, folder_partition(matched.column("path"), r), r)
    copied = split(copied, folder_partition(copied.column("path"), r), r)
    rest = split(rest, folder_partition(rest.column("path"), r), r)
    return ({"copies": [len(t) for t in matched], "rest": [len(t) for t in rest]}, *matched, *copied, *rest)


# -- step 4: numbering and writing the plan pieces ---------------------------------------------------------


def shards_for(n: int, per: int) -> int:
    return math.ceil(n / per) if n else 0


def write_unit(s: DiffSettings, unit: int, base: int, matched: list, copied: list, fresh: list) -> dict:
    """One folder partition's new shards from `base` on: copies first, then the other fresh entries, each in
    path order (a folder's photos side by side); written as plan pieces `_sync/copies-RRRR-UUUUU` and
    `_sync/entries-RRRR-UUUUU-m-FIRST-LAST` (manifest pieces as they are, moved into `_manifest/` when the
    plan is applied)."""
    matched = _concat(_fetch(matched), _MATCH_SCHEMA).sort_by([("path", "ascending")])
    copied = _concat(_fetch(copied), ENTRY_SCHEMA).sort_by([("path", "ascending")])
    rest = _concat(_fetch(fresh), ENTRY_SCHEMA).sort_by([("path", "ascending")])
    per = s.per_shard
    store = s.store()
    n_copy = len(matched)
    copy_shard = pa.array(base + np.arange(n_copy, dtype=np.int64) // per, pa.int64())
    if n_copy:
        copies = pa.table({"shard": copy_shard, "path": matched.column("path"),
                           "old_shard": matched.column("old_shard"), "old_path": matched.column("old_path")},
                          schema=COPIES_SCHEMA)
        _write(store, f"{SYNC_DIR}/copies-{s.run:04d}-{unit:05d}.parquet", copies)
    rest_base = base + shards_for(n_copy, per)
    rest_shard = pa.array(rest_base + np.arange(len(rest), dtype=np.int64) // per, pa.int64())
    # copied holds the same paths as matched, in the same (path) order: the same shard numbers line up
    entries = pa.concat_tables([copied.append_column("shard", copy_shard), rest.append_column("shard", rest_shard)])
    pieces = 0
    shards = entries.column("shard").to_numpy()
    start = 0
    while start < len(entries):  # pieces of whole shards, PIECE_ENTRIES at most (as manifest.write_entries)
        end = min(start + PIECE_ENTRIES, len(entries))
        while end < len(entries) and shards[end] == shards[end - 1]:
            end += 1
        name = piece_name(int(shards[start]), int(shards[end - 1]))
        store.write(f"{SYNC_DIR}/entries-{s.run:04d}-{unit:05d}-{name}",
                    entries.slice(start, end - start).cast(MANIFEST_SCHEMA), **PIECE_ENCODING)
        pieces += 1
        start = end
    return {"unit": unit, "entries": len(entries), "copies": n_copy, "pieces": pieces,
            "shards": _shard_counts(entries)}


def _write(store: OutputStore, name: str, table: pa.Table) -> None:
    store.write(name, table, compression="zstd")


# -- running the steps ---------------------------------------------------------------------------------------


class Steps:
    """Runs a step as a Ray task (results stay in the object store, the driver holds references), or in
    this process when `local`."""

    def __init__(self, local: bool):
        self.local = local
        self._remote: dict = {}

    def call(self, fn: Callable, *args, returns: int = 1):
        """The step's result(s): a list of `returns` references (or values, in place)."""
        if self.local:
            out = fn(*args)
            return list(out) if returns > 1 else [out]
        import ray

        key = (fn, returns)
        if key not in self._remote:
            self._remote[key] = ray.remote(fn).options(num_cpus=DIFF_CPUS, num_returns=returns, max_retries=2)
        out = self._remote[key].remote(*args)
        return list(out) if returns > 1 else [out]

    def get(self, items: list) -> list:
        if self.local:
            return list(items)
        import ray

        return ray.get(list(items))

    def put(self, value):
        if self.local:
            return value
        import ray

        return ray.put(value)


@dataclass
class DiffResult:
    """What the driver keeps of a partitioned diff: counts, the new shard numbering, the manifest's shards."""

    counts: dict
    next_shard: int
    skipped: Skipped
    expected: dict[int, int]  # shard -> entries, of the manifest as it was (before the plan)
    after: dict[int, int] = field(default_factory=dict)  # shard -> entries once the plan is applied
    pieces: dict = field(default_factory=dict)  # plan pieces written: entries, copies, drops
    partitions: int = 1
    seconds: dict = field(default_factory=dict)

    def touches_output(self) -> bool:
        return bool(self.pieces.get("entries") or self.pieces.get("drops"))


def manifest_pieces(store: OutputStore) -> list[tuple[str, int]]:
    """The manifest's pieces with their entry counts (one footer read each, concurrently)."""
    names = manifest_log(store).names()

    def rows(name: str) -> int:
        with store.fs.open(store.path(f"{MANIFEST_DIR}/{name}"), "rb") as f:
            return pq.read_metadata(f).num_rows

    with ThreadPoolExecutor(16) as pool:
        return list(zip(names, pool.map(rows, names)))


def _groups(pieces: list[tuple[str, int]], rows: int) -> list[list[str]]:
    """Consecutive pieces in groups of about `rows` entries."""
    out, cur, n = [], [], 0
    for name, k in pieces:
        cur.append(name)
        n += k
        if n >= rows:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def clear_work(store: OutputStore) -> None:
    """Plan pieces an uncommitted earlier try left in _sync/ (only called when no plan is committed)."""
    for n in store.list_dir(SYNC_DIR):
        store.remove(f"{SYNC_DIR}/{n}")


def partitioned_diff(s: DiffSettings, steps: Steps, sources: Iterable, pieces: list[tuple[str, int]],
                     done: set[int], next_shard: int) -> DiffResult:
    """The whole diff: `sources` yields listing batches (tables, or callables a task runs to get pages),
    `pieces` are the manifest's (name, rows). Plan pieces are written under _sync/ for run `s.run`."""
    import time

    t0 = time.perf_counter()
    P, Q = s.partitions, s.move_partitions
    done_ref = steps.put(pa.array(sorted(done), pa.int64()))
    starts = shard_groups(pieces, P)
    G = len(starts)
    starts_ref = steps.put(starts)
    # step 1: split; the driver keeps references, one per (batch, partition)
    man_parts: list[list] = [[] for _ in range(P)]
    count_refs = []
    for group in _groups(pieces, MAP_ROWS):
        out = steps.call(split_manifest, s, group, returns=P + 1)
        count_refs.append(out[0])
        for p in range(P):
            man_parts[p].append(out[p + 1])
    list_parts: list[list] = [[] for _ in range(P)]
    info_refs = []
    for source in sources:
        out = steps.call(split_listing, s, source, returns=P + 1)
        info_refs.append(out[0])
        for p in range(P):
            list_parts[p].append(out[p + 1])
    t1 = time.perf_counter()
    # step 2: a diff per path partition
    summaries = []
    plain_r: list[list] = [[] for _ in range(P)]  # fresh rows without an ETag, by folder partition
    fresh_q: list[list] = [[] for _ in range(Q)]
    donors_q: list[list] = [[] for _ in range(Q)]
    drops_g: list[list] = [[] for _ in range(G)]
    for p in range(P):
        out = steps.call(diff_partition, s, p, list_parts[p], man_parts[p], done_ref, starts_ref,
                         returns=1 + P + 2 * Q + G)
        summaries.append(out[0])
        for r in range(P):
            plain_r[r].append(out[1 + r])
        for q in range(Q):
            fresh_q[q].append(out[1 + P + q])
            donors_q[q].append(out[1 + P + Q + q])
        for g in range(G):
            drops_g[g].append(out[1 + P + 2 * Q + g])
    del list_parts, man_parts
    # step 3: moves per (size, ETag) partition; what is left goes back to its folder partition
    matched_r: list[list] = [[] for _ in range(P)]
    copied_r: list[list] = [[] for _ in range(P)]
    rest_r: list[list] = [[] for _ in range(P)]
    match_refs = []
    for q in range(Q):
        out = steps.call(match_moves, s, fresh_q[q], donors_q[q], returns=1 + 3 * P)
        match_refs.append(out[0])
        for r in range(P):
            matched_r[r].append(out[1 + r])
            copied_r[r].append(out[1 + P + r])
            rest_r[r].append(out[1 + 2 * P + r])
    del fresh_q, donors_q
    summaries = steps.get(summaries)
    # the drops, one plan piece per shard group (each applied by its own task)
    drop_writes = [steps.call(write_drops, s, g, drops_g[g])[0] for g in range(G)
                   if any(x["drop_groups"][g] for x in summaries)]
    del drops_g
    match_sums = steps.get(match_refs)
    t2 = time.perf_counter()
    # step 4: number the new shards folder partition by folder partition (copies, then the other fresh
    # entries, each in path order), each partition's task writing its own plan pieces
    per = s.per_shard
    units = []
    base = next_shard
    for r in range(P):
        copies = sum(m["copies"][r] for m in match_sums)
        fresh = sum(m["rest"][r] for m in match_sums) + sum(x["plain"][r] for x in summaries)
        if copies or fresh:
            units.append(steps.call(write_unit, s, len(units), base, matched_r[r], copied_r[r],
                                    rest_r[r] + plain_r[r])[0])
            base += shards_for(copies, per) + shards_for(fresh, per)
    written = steps.get(units)
    drop_pieces = len(steps.get(drop_writes))
    infos = steps.get(info_refs)
    expected: dict[int, int] = {}
    for c in steps.get(count_refs):
        expected.update(c)
    skipped = Skipped()
    for info in infos:
        skipped.count += info["skipped"]
        room = SKIPPED_EXAMPLES - len(skipped.examples)
        skipped.examples.extend(info["examples"][:max(room, 0)])
    total = {k: sum(x[k] for x in summaries) for k in ("listed", "unchanged", "changed", "deleted", "added", "drops")}
    reused = sum(sum(m["copies"]) for m in match_sums)
    counts = {"listed": total["listed"], "unchanged": total["unchanged"], "new": total["added"] - reused,
              "changed": total["changed"], "deleted": total["deleted"], "reused": reused}
    pieces_out = {"entries": sum(w["pieces"] for w in written), "copies": sum(bool(w["copies"]) for w in written),
                  "drops": drop_pieces}
    after = dict(expected)
    for x in summaries:
        for shard, n in x["drop_shards"].items():
            after[shard] -= n
            if after[shard] <= 0:
                del after[shard]
    for w in written:
        after.update(w["shards"])
    return DiffResult(counts, base, skipped, expected, after, pieces_out, P,
                      {"split": round(t1 - t0, 3), "diff": round(t2 - t1, 3),
                       "write": round(time.perf_counter() - t2, 3)})


def batched(pages: Iterator[pa.Table], rows: int = MAP_ROWS) -> Iterator[pa.Table]:
    """Listing pages from the driver in tables of about `rows` entries (each shipped to a split task)."""
    buf, n = [], 0
    for page in pages:
        buf.append(page)
        n += len(page)
        if n >= rows:
            yield pa.concat_tables(buf).combine_chunks()
            buf, n = [], 0
    if buf:
        yield pa.concat_tables(buf).combine_chunks()


def read_plan_pieces(store: OutputStore, run: int, kind: str, schema: pa.Schema) -> pa.Table:
    """Every `_sync/{kind}-RRRR*` piece of a plan as one table (the plan's changes, not the library); entry
    pieces that are manifest pieces (`...-m-FIRST-LAST.parquet`) excepted: see move_entry_pieces."""
    return PieceLog(store, SYNC_DIR, schema, lambda n: n.startswith(f"{kind}-{run:04d}") and n.endswith(".parquet")
                    and "-m-" not in n).read()


def move_entry_pieces(store: OutputStore, run: int) -> int:
    """The plan's new entries into the manifest: each entry piece is a manifest piece already, copied under
    its manifest name (concurrently; a store-side copy on S3, no rows through this process). Idempotent:
    a piece copied twice is the same piece. Returns pieces moved."""
    pieces = entry_pieces(store, run)

    def move(item: tuple[str, str]) -> None:
        src, dst = item
        if store.is_local():  # a local copy is not atomic: write the bytes as every piece is written
            with store.fs.open(store.path(f"{SYNC_DIR}/{src}"), "rb") as f:
                store.write(f"{MANIFEST_DIR}/{dst}", f.read())
        else:  # an object store's copy is atomic and never leaves the store
            store.fs.copy(store.path(f"{SYNC_DIR}/{src}"), store.path(f"{MANIFEST_DIR}/{dst}"))

    if pieces:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(move, pieces))
    return len(pieces)


def entry_pieces(store: OutputStore, run: int) -> list[tuple[str, str]]:
    """The plan's entry pieces: (name under _sync/, the manifest piece name it becomes)."""
    prefix = f"entries-{run:04d}-"
    out = []
    for n in store.list_dir(SYNC_DIR):
        if n.startswith(prefix) and "-m-" in n:
            out.append((n, "m-" + n.split("-m-", 1)[1]))
    return out



# -- the manifest after the plan: pending shards, read piece by piece --------------------------------------


def last_manifest_shard(store: OutputStore) -> int:
    """The highest shard any manifest piece holds (-1 when none): new shards start above it even when a
    killed first run never stored its next_shard."""
    ranges = [r for n in store.list_dir(MANIFEST_DIR) if (r := piece_range(n))]
    return max((r[1] for r in ranges), default=-1)


def entries_of(store: OutputStore, shards: set[int]) -> Iterator[pa.Table]:
    """The manifest entries of these shards, one piece at a time (a piece holds whole shards), in shard order:
    the driver holds one piece, never the manifest."""
    if not shards:
        return
    lo, hi = min(shards), max(shards)
    wanted = pa.array(sorted(shards), pa.int64())
    names = sorted((r, n) for n in store.list_dir(MANIFEST_DIR) if (r := piece_range(n)))
    for (first, last), name in names:
        if last < lo or first > hi:
            continue
        piece = manifest_log(store).read_one(name)
        piece = piece.filter(pc.is_in(piece.column("shard"), value_set=wanted))
        if len(piece):
            yield piece.sort_by([("shard", "ascending"), ("path", "ascending")])


def manifest_counts(store: OutputStore) -> dict[int, int]:
    """shard -> entries over the whole manifest, piece by piece (O(shards) kept)."""
    counts: dict[int, int] = {}
    for name in store.list_dir(MANIFEST_DIR):
        if piece_range(name):
            counts.update(_shard_counts(read_parquet(store.fs, store.path(f"{MANIFEST_DIR}/{name}"), ["shard", "path"])))
    return counts


# -- where tonight's listing comes from ---------------------------------------------------------------------

LISTING_TASKS = 16  # S3 listers at once when the diff runs in Ray


def listing_sources(cfg: InputConfig, fmt: str, local: bool, retry_window_s: float, listing=None):
    """Tonight's listing as sources for split tasks, and how many entries it is about to hold (0: unknown):
    an inventory's files (each read by its own task), an S3 input's prefixes (listing tasks) when the diff
    runs in Ray, else the driver's own listing in batches (`listing`, when the caller has started it).
    input.limit (trial runs): selected in the driver."""
    from resnet_batch.embed.listing import list_entries
    from resnet_batch.storage import is_s3

    pages = (lambda: listing.pages) if listing is not None else (lambda: list_entries(cfg, retry_window_s).pages)
    if cfg.limit is not None:
        from resnet_batch.embed.plan import select

        table, skipped = select(cfg, fmt, pages())
        return [_Selected(table, skipped.count, tuple(skipped.examples))], len(table)
    if cfg.inventory:
        from resnet_batch.embed.inventory import inventory_files, rows_estimate

        files = inventory_files(cfg.inventory, dict(cfg.storage_options), cfg.uri)
        return files, rows_estimate(files)
    if is_s3(cfg.uri) and not local:
        from resnet_batch.embed.listing import listing_tasks

        return listing_tasks(cfg.uri, dict(cfg.storage_options), LISTING_TASKS, retry_window_s), 0
    return batched(pages()), 0


@dataclass(frozen=True)
class _Selected:
    """Entries already selected by the driver (input.limit), with what it skipped."""

    table: pa.Table
    skipped: int
    examples: tuple[str, ...]


def plan_sync(cfg: InputConfig, fmt: str, root: str, store: OutputStore, run: int, state_next_shard: int,
              done: set[int], retry_window_s: float, start_ray: Callable[[], None], listing=None) -> DiffResult:
    """Tonight's sync plan, written under _sync/ (not committed): the number of partitions from the size of
    the manifest and of the inventory; one partition runs here without Ray, more run as Ray tasks
    (`start_ray` is called first)."""
    from resnet_batch.output.state import load

    clear_work(store)
    pieces = manifest_pieces(store)
    manifest_rows = sum(n for _, n in pieces)
    # The manifest tells the size of the library once a run has completed; a first run that was killed may
    # have listed a sliver of it, so its resume looks at the listing itself: when it ends within one
    # partition (and what the driver lists at most), the diff runs here; else in Ray, whatever the manifest
    # holds.
    state = load(store)
    listed_whole = state is not None and any(r.get("status") == "complete" for r in state.runs)
    local = partitions_for(manifest_rows) == 1 and listed_whole
    if partitions_for(manifest_rows) == 1 and not listed_whole and not cfg.inventory and cfg.limit is None:
        from resnet_batch.embed.listing import DRIVER_LISTING_KEYS, list_entries, listed_within

        started = listing if listing is not None else list_entries(cfg, retry_window_s)
        listing = listed_within(started, min(DRIVER_LISTING_KEYS, ROWS_PER_PARTITION))
        local = listing is not None  # None: listed again below, in tasks or in batches
    sources, estimate = listing_sources(cfg, fmt, local, retry_window_s, listing)
    partitions = partitions_for(max(manifest_rows, estimate))
    if partitions > 1 or not local:
        local = False
        start_ray()
        partitions = max(partitions, MIN_RAY_PARTITIONS)
        if not cfg.inventory and cfg.limit is None and isinstance(sources, Iterator):
            # the driver's listing was chosen for one partition; an S3 input lists in tasks instead
            sources, _ = listing_sources(cfg, fmt, False, retry_window_s, listing)
    s = DiffSettings(input=cfg, fmt=fmt, root=root, output_uri=store.uri, output_options=dict(store.storage_options),
                     retry_window_s=retry_window_s, run=run, partitions=partitions, move_partitions=partitions)
    next_shard = max(state_next_shard, last_manifest_shard(store) + 1)
    if local:
        return partitioned_diff(s, Steps(local=True), sources, pieces, done, next_shard)
    import ray

    # The steps are run by a coordinating task, not by the driver: Ray keeps a task's small results (under
    # 100 KB, such as most of a night's per-partition changes) in the memory of whoever called it, which
    # would make the driver grow with the library. Listing batches the driver reads itself go to the object
    # store first (the driver keeps their references only).
    if isinstance(sources, Iterator):
        sources = [ray.put(batch) for batch in sources]
    coordinate = ray.remote(_coordinate).options(num_cpus=0, max_retries=0)
    return ray.get(coordinate.remote(s, sources, pieces, done, next_shard))


def _coordinate(s: DiffSettings, sources: list, pieces: list, done: set[int], next_shard: int) -> DiffResult:
    """partitioned_diff with its steps in Ray tasks, itself run in a task (see plan_sync)."""
    return partitioned_diff(s, Steps(local=False), sources, pieces, done, next_shard)


# -- the manifest's dropped entries, in parallel tasks ------------------------------------------------------


def drop_sources(store: OutputStore, run: int) -> list:
    """The drops of plan `run` as sources that can be applied in parallel, one task each: the names of its
    shard-group pieces (their ranges never overlap). A plan whose drops are not in shard groups (one piece
    per path partition, as an earlier version wrote them) is read here as one table: one source."""
    names = sorted(n for n in store.list_dir(SYNC_DIR) if n.startswith(f"drops-{run:04d}") and n.endswith(".parquet"))
    if len(names) <= 1 or all(n.startswith(f"drops-{run:04d}-g") for n in names):
        return names
    return [read_plan_pieces(store, run, "drops", DROPS_SCHEMA)]


def read_drops(store: OutputStore, source) -> pa.Table:
    """A drops source (see drop_sources): a plan piece's name, or the table itself."""
    if isinstance(source, str):
        return read_parquet(store.fs, store.path(f"{SYNC_DIR}/{source}")).cast(DROPS_SCHEMA)
    return _fetch([source])[0]


def drop_source(where: tuple, ranges: list, source) -> int:
    """A task: the manifest pieces that hold one drops source's entries, each rewritten without them
    (output/manifest.drop_from_piece, idempotent). Returns pieces changed."""
    store = OutputStore(*where)
    drops = read_drops(store, source)
    shards = drops.column("shard").to_numpy()
    order = np.argsort(shards, kind="stable")
    drops, shards = drops.take(pa.array(order)), shards[order]
    changed = 0
    for (first, last), name in ranges:
        lo, hi = np.searchsorted(shards, first, "left"), np.searchsorted(shards, last, "right")
        if hi > lo:
            changed += drop_from_piece(store, name, drops.slice(int(lo), int(hi - lo)))
    return changed


def drop_manifest_entries(store: OutputStore, drops) -> int:
    """The manifest without the dropped entries: `drops` a table, or drops sources (drop_sources), each
    applied by a Ray task of its own (in this process when Ray is not running); the driver holds names, never
    the drops. Returns pieces changed."""
    import ray

    sources = [drops] if isinstance(drops, pa.Table) else list(drops)
    sources = [x for x in sources if not isinstance(x, pa.Table) or len(x)]
    if not sources:
        return 0
    steps = Steps(local=not ray.is_initialized())
    where = (store.uri, dict(store.storage_options), store.window)
    ranges = sorted((r, n) for n in store.list_dir(MANIFEST_DIR) if (r := piece_range(n)))
    return sum(steps.get([steps.call(drop_source, where, ranges, x)[0] for x in sources]))
