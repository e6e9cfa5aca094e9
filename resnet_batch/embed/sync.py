"""sync module: applying a sync plan to an output, idempotently, in Ray tasks (the driver moves no rows).

Order matters and is kept: (1) copies (rows of moved or copied objects, written as new parts from the parts
that hold them), (2) drops (rows of deleted and changed objects leave their parts; a part left empty is
deleted; a changed tar or Parquet file's parts go), (3) the manifest (new entries stored, dropped ones
removed). The plan is stored under `_sync/` and committed in `_state.json` before step 1, so a run killed in
the middle is rolled forward by the next one: every step can be done twice with the same result, in what
it writes and in what it records (a step done again returns the records of the parts it finds already
done, so the ledger and the parts agree after a kill at any point; docs/safety.md).
"""
from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import ray

from resnet_batch.embed.listing import from_raw, storable
from resnet_batch.output.manifest import MANIFEST_SCHEMA, write_entries
from resnet_batch.output.pieces import PieceLog
from resnet_batch.embed.plan import COPIES_SCHEMA, DROPS_SCHEMA, SyncPlan
from resnet_batch.schema import PART_STATS_KEY, STATUS_OK
from resnet_batch.storage import display_path
from resnet_batch.output.store import (SYNC_DIR, OutputStore, PartSettings, encode_part, part_name, part_record,
                                 read_parquet, write_file)

COPY_CPUS = 0.5
DROP_THREADS = 4  # parts a drops task rewrites at once (reading and writing parts waits on the store)


PLAN_TABLES = (("entries", MANIFEST_SCHEMA), ("drops", DROPS_SCHEMA), ("copies", COPIES_SCHEMA))


def plan_log(store: OutputStore, table: str, schema: pa.Schema) -> PieceLog:
    """One table of sync plans as a piece log: `_sync/TABLE-RRRR.parquet`, one piece per run."""
    return PieceLog(store, SYNC_DIR, schema, lambda n: n.startswith(f"{table}-") and n.endswith(".parquet"),
                    compression="zstd")


def store_plan(store: OutputStore, run: int, plan: SyncPlan) -> None:
    """The plan's three tables under _sync/ (committed afterwards by the state file)."""
    for (name, schema), table in zip(PLAN_TABLES, (plan.new_entries, plan.drops, plan.copies)):
        plan_log(store, name, schema).write(f"{name}-{run:04d}.parquet", table)


def load_plan(store: OutputStore, run: int) -> tuple[pa.Table, list, list[str]]:
    """A stored plan's entries, drops and copies: the single tables of `store_plan`, or the pieces that the
    partitioned diff's tasks wrote (syncdiff). Entry pieces written as manifest pieces are not read here:
    `syncdiff.move_entry_pieces` moves them into the manifest as they are. The drops and the copies are not
    read either: they come as sources that tasks apply, the drops as pieces of shard groups
    (syncdiff.drop_sources), the copies as their pieces' names (each piece holds whole new shards that no
    other piece holds)."""
    from resnet_batch.embed.syncdiff import drop_sources, read_plan_pieces

    entries = read_plan_pieces(store, run, "entries", MANIFEST_SCHEMA)
    copies = sorted(n for n in store.list_dir(SYNC_DIR) if n.startswith(f"copies-{run:04d}") and n.endswith(".parquet"))
    return entries, drop_sources(store, run), copies


def clear_plan(store: OutputStore) -> None:
    for n in store.list_dir(SYNC_DIR):
        store.remove(f"{SYNC_DIR}/{n}")


def apply(store: OutputStore, part: PartSettings, fmt: str, root: str, protocol: str, entries: pa.Table,
          drops: list, copies: list[str], parts: dict[str, tuple[int, int]],
          records: dict[int, list[dict]], on_record: Callable[[dict], None],
          flush: Callable[[], None] = lambda: None) -> dict:
    """Carry out a stored plan. `drops`: its drops sources (syncdiff.drop_sources: piece names of shard
    ranges that never overlap, or one table), `copies`: its copies pieces' names, each applied by a task of
    its own, so the driver never holds the night's deleted or moved photos; `parts`: the output's part files now; `records`: ledger records by shard;
    `flush` stores the records handed to `on_record` (called after each step, before the next one starts).
    Returns counts: copied rows, dropped rows, parts rewritten / deleted."""
    out = {"copied": 0, "dropped": 0, "rewritten": 0, "deleted": 0}
    remote = ray.remote(num_cpus=COPY_CPUS, max_retries=2)
    pending = []
    by_shard: dict[int, list] = defaultdict(list)
    for name, (s, c) in parts.items():
        by_shard[s].append((c, name))
    where = (store.uri, dict(store.storage_options), store.window)
    shard_parts = ray.put(dict(by_shard)) if len(copies) or len(drops) else None
    # (1) copies: a task per copies piece (whole new shards), its shards a few at a time
    if len(copies):
        copy_fn = _copy  # looked up now: what the task runs for each new shard
        old = ray.put(records)
        pending = [remote(_copy_source).remote(part, fmt, root, protocol, where, name, shard_parts, old, copy_fn)
                   for name in copies]
        for recs in ray.get(pending):
            for r in recs:
                on_record(r)
                out["copied"] += r["rows"]
        flush()
        pending = []
    # (2) drops: a task per drops source (a range of shards), its shards' parts a few at a time
    if len(drops):
        drop_fn = _drop  # looked up now: what the task runs for each shard
        pending = [remote(_drop_source).remote(part, fmt, where, source, shard_parts, drop_fn) for source in drops]
        for recs, rewritten, deleted, dropped in ray.get(pending):
            for r in recs:
                on_record(r)
            out["rewritten"] += rewritten
            out["deleted"] += deleted
            out["dropped"] += dropped
        flush()
    # (3) the manifest (each piece that loses entries rewritten in its own task)
    from resnet_batch.embed.syncdiff import drop_manifest_entries

    drop_manifest_entries(store, drops)
    write_entries(store, entries)
    return out


def _groups(table: pa.Table, column: str):
    table = table.sort_by([(column, "ascending")])
    values = table.column(column).to_pylist()
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            yield values[start], table.slice(start, i - start)
            start = i


def _copy_source(part: PartSettings, fmt: str, root: str, protocol: str, where: tuple, name: str,
                 shard_parts: dict, records: dict, copy: Callable) -> list[dict]:
    """A task: one copies piece of the plan (`_sync/copies-...`: whole new shards no other piece holds),
    each new shard's rows copied from the parts that hold them, DROP_THREADS shards at a time (`copy`:
    _copy). Returns the records of the parts written."""
    from concurrent.futures import ThreadPoolExecutor

    store = OutputStore(*where)
    copies = read_parquet(store.fs, store.path(f"{SYNC_DIR}/{name}")).cast(COPIES_SCHEMA)

    def one(item):
        shard, group = item
        items = [(from_raw(p), o, from_raw(op)) for p, o, op in zip(group.column("path").to_pylist(),
                                                                     group.column("old_shard").to_pylist(),
                                                                     group.column("old_path").to_pylist())]
        sources = {o: sorted(shard_parts.get(o, [])) for _, o, _ in items}
        meta = {o: {r["chunk"]: r for r in records.get(o, [])} for o in sources}
        return copy(part, fmt, root, protocol, shard, items, sources, meta)

    with ThreadPoolExecutor(DROP_THREADS) as pool:
        return [r for recs in pool.map(one, _groups(copies, "shard")) for r in recs]


def _drop_source(part: PartSettings, fmt: str, where: tuple, source, shard_parts: dict,
                 drop: Callable) -> tuple[list[dict], int, int, int]:
    """A task: one drops source (syncdiff.drop_sources) applied to the parts of its shards, DROP_THREADS
    shards at a time (`drop`: _drop). No other task touches these shards. Returns (records, parts rewritten,
    parts deleted, rows dropped)."""
    from concurrent.futures import ThreadPoolExecutor

    from resnet_batch.embed.syncdiff import read_drops

    drops = read_drops(OutputStore(*where), source)

    def one(item):
        shard, group = item
        ids = sorted(storable(from_raw(p)) for p in group.column("path").to_pylist())
        return drop(part, fmt, shard, ids, sorted(shard_parts.get(shard, [])))

    records, rewritten, deleted = [], 0, 0
    with ThreadPoolExecutor(DROP_THREADS) as pool:
        for recs, r, d in pool.map(one, _groups(drops, "shard")):
            records += recs
            rewritten += r
            deleted += d
    return records, rewritten, deleted, len(drops)


def _copy(part: PartSettings, fmt: str, root: str, protocol: str, shard: int, items: list,
          sources: dict[int, list], meta: dict[int, dict]) -> list[dict]:
    """Rows of earlier parts written again as this shard's part(s), under their new ids and paths.

    A part this plan's copy already wrote (an earlier attempt, killed before its record reached the ledger)
    is kept and its own record returned: its sources may be gone by now (the drops follow the copies), so
    writing it again could only lose rows."""
    import os
    import time

    from resnet_batch.embed.model import _node_name

    fs, out_root = part.fs()
    records = []
    if fmt == "folder" and (done := _copied(fs, posixpath.join(out_root, part_name(shard)), part.run)) is not None:
        return [done]
    if fmt == "folder":
        wanted: dict[int, dict[str, tuple[str, str]]] = defaultdict(dict)
        for new_rel, old_shard, old_rel in items:
            wanted[old_shard][storable(old_rel)] = (storable(new_rel),
                                                    display_path(protocol, storable(posixpath.join(root, new_rel))))
        tables = []
        for old_shard, ids in wanted.items():
            for _, name in sources[old_shard]:
                t = read_parquet(fs, posixpath.join(out_root, name))
                t = t.filter(pc.is_in(t.column("image_id"), pa.array(list(ids), pa.string())))
                new_ids = [ids[i][0] for i in t.column("image_id").to_pylist()]
                new_paths = [ids[i][1] for i in t.column("image_id").to_pylist()]
                t = t.set_column(t.schema.get_field_index("image_id"), "image_id", pa.array(new_ids, pa.string()))
                t = t.set_column(t.schema.get_field_index("path"), "path", pa.array(new_paths, pa.string()))
                tables.append(t)
        outputs = [(-1, pa.concat_tables(tables), 1, 0)]
    else:
        (new_rel, old_shard, old_rel), = items
        old_id, new_id = storable(old_rel), storable(new_rel)
        old_shown = display_path(protocol, storable(posixpath.join(root, old_rel)))
        new_shown = display_path(protocol, storable(posixpath.join(root, new_rel)))
        outputs = []
        for chunk, name in sources[old_shard]:
            t = read_parquet(fs, posixpath.join(out_root, name))
            ids = [new_id + i[len(old_id):] if i.startswith(old_id + "/") else i for i in t.column("image_id").to_pylist()]
            paths = [new_shown + p[len(old_shown):] if p.startswith(old_shown) else p for p in t.column("path").to_pylist()]
            t = t.set_column(t.schema.get_field_index("image_id"), "image_id", pa.array(ids, pa.string()))
            t = t.set_column(t.schema.get_field_index("path"), "path", pa.array(paths, pa.string()))
            m = meta[old_shard].get(chunk, {})
            outputs.append((chunk, t, m.get("chunks", -1), m.get("skipped", 0)))
        for chunk, m in meta[old_shard].items():  # an empty last chunk has a record but no part
            if not m.get("part"):
                outputs.append((chunk, None, m.get("chunks", -1), m.get("skipped", 0)))
    for chunk, table, chunks, skipped in outputs:
        record = {"part": "", "shard": shard, "chunk": chunk, "chunks": chunks, "rows": 0, "ok": 0, "failed": 0,
                  "skipped": skipped, "decode_s": 0.0, "model_s": 0.0, "write_s": 0.0, "bytes": 0,
                  "node": _node_name(), "pid": os.getpid(), "device": "copy", "actor": "", "run": part.run,
                  "written_at": time.time()}
        if table is not None and (done := _copied(fs, posixpath.join(out_root, part_name(shard, chunk)),
                                                  part.run)) is not None:
            records.append(done)
            continue
        if table is not None:
            name = part_name(shard, chunk)
            ok = int(pc.sum(pc.equal(table.column("status"), STATUS_OK)).as_py() or 0)
            record.update(part=name, rows=len(table), ok=ok, failed=len(table) - ok)
            data = encode_part(table, part.schema, record, part.compression, record["node"], record["pid"])
            write_file(fs, posixpath.join(out_root, name), data, part.retry_window_s)
            record["bytes"] = len(data)
        records.append(record)
    return records


def _copied(fs, path: str, run: int) -> Optional[dict]:
    """The record of a part that a copy of run `run` wrote at `path` (None when there is none such)."""
    try:
        record = part_record(fs, path)
    except FileNotFoundError:
        return None
    if record and record.get("device") == "copy" and record.get("run") == run:
        return record
    return None


def _drop(part: PartSettings, fmt: str, shard: int, ids: list[str], sources: list) -> tuple[list[dict], int, int]:
    """This shard's rows of deleted or changed objects leave its part(s): a folder part is rewritten without
    them (deleted when nothing is left); a tar or Parquet shard's parts all go (the file is gone or new).

    Idempotent in what it records, not only in what it writes: every folder part that remains yields its
    record, read from the part's own metadata when an earlier, killed attempt already rewrote it. A driver
    killed after the rewrite but before the record reached the ledger is thus caught up by the next run
    (the ledger and the parts agree again). Returns (records, parts rewritten now, parts deleted now)."""
    import time

    fs, out_root = part.fs()
    records, rewritten, deleted = [], 0, 0
    for chunk, name in sources:
        path = posixpath.join(out_root, name)
        if fmt != "folder":
            _rm(fs, path)
            deleted += 1
            continue
        try:
            t = read_parquet(fs, path)
        except FileNotFoundError:
            continue  # an earlier attempt deleted it (nothing was left)
        keep = t.filter(pc.invert(pc.is_in(t.column("image_id"), pa.array(ids, pa.string()))))
        if len(keep) == len(t):
            own = (t.schema.metadata or {}).get(PART_STATS_KEY)
            if own:  # already without them: its own record, which the ledger may lack
                records.append(json.loads(own))
            continue
        if not len(keep):
            _rm(fs, path)
            deleted += 1
            continue
        record = json.loads((t.schema.metadata or {}).get(PART_STATS_KEY) or b"{}")
        ok = int(pc.sum(pc.equal(keep.column("status"), STATUS_OK)).as_py() or 0)
        record.update(part=name, shard=shard, chunk=chunk, rows=len(keep), ok=ok, failed=len(keep) - ok,
                      run=part.run, written_at=time.time())
        data = encode_part(keep, part.schema, record, part.compression, record.get("node", ""), record.get("pid", 0))
        write_file(fs, path, data, part.retry_window_s)
        records.append(record)
        rewritten += 1
    return records, rewritten, deleted


def _rm(fs, path: str) -> None:
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass

