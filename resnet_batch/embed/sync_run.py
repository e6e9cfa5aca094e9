"""sync_run module: a run into an existing output: a committed sync rolled forward, the input compared with the
manifest (a partitioned diff, embed/syncdiff) and the difference applied (embed/sync), then what is not done
yet (and with --retry-failed, what failed) run. A night with nothing to do answers without starting Ray."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.embed.dispatch import dispatch
from resnet_batch.embed.job import Job
from resnet_batch.embed.listing import FORMATS, Shard, shard_of
from resnet_batch.embed.plan import complete_shards, no_input, todo_shards
from resnet_batch.embed.reconcile import current_ledger, finish
from resnet_batch.errors import RunFailed
from resnet_batch.output.state import OutputState, save
from resnet_batch.output.store import SYNC_DIR, read_parquet

if TYPE_CHECKING:
    from resnet_batch.embed.scheduler import ShardQueue


def sync_run(job: Job, state: OutputState, listing, retry_failed: bool) -> dict:
    """An existing output: compare the input with the manifest (a partitioned diff: the driver holds
    counts, not rows), apply the difference, run what is left. A night with nothing to do answers
    without starting Ray."""
    from resnet_batch.embed.syncdiff import entries_of, plan_sync

    cfg, store = job.cfg, job.store
    run_no = state.next_run()
    if state.pending:  # a sync that was committed but not finished: roll it forward first
        _apply(job, state, state.pending["run"])
    else:  # a plan stored but never committed, or uncommitted but not yet cleared (a killed run)
        for name in store.list_dir(SYNC_DIR):
            if name:
                store.remove(f"{SYNC_DIR}/{name}")
    ledger, parts = current_ledger(job)
    done, by_shard = complete_shards(ledger)
    t0 = time.perf_counter()
    plan = plan_sync(cfg.input, state.format, state.root, store, run_no, state.next_shard, done,
                     cfg.compute.retry_window_s, job.ensure_ray, listing=listing)
    job.sync = {**plan.counts, "partitions": plan.partitions, "plan_s": round(time.perf_counter() - t0, 3),
                "steps_s": plan.seconds, "removed": plan.counts["deleted"]}
    state.runs.append(job.run_entry(run_no))
    expected = plan.after
    if plan.touches_output():
        job.unpublish()
        state.pending, state.next_shard = {"run": run_no}, plan.next_shard
        save(store, state)  # committed: a kill from here on is rolled forward by the next run
        _apply(job, state, run_no)
        ledger, parts = current_ledger(job)
        done, by_shard = complete_shards(ledger)
    else:
        state.next_shard = max(state.next_shard, plan.next_shard)
        save(store, state)
    if not expected:
        raise no_input(cfg.input, state.format, plan.counts["listed"])
    todo = {s for s in expected if s not in done}
    job.done_before = sum(by_shard[s]["rows"] for s in done if s in by_shard)
    retries = _retry_shards(job, state, ledger, done) if retry_failed else []
    if todo or retries:
        from resnet_batch.embed.scheduler import ShardQueue

        queue = ShardQueue()
        shards = (shard for piece in entries_of(store, todo) for shard in todo_shards(state.format, state.root,
                                                                                       piece))
        feeder = threading.Thread(target=_feed, args=(queue, retries, shards), daemon=True)
        feeder.start()
        # tar and Parquet files hold an unknown number of images until they are read
        job.progress.planned(sum(expected[s] for s in todo) + sum(len(s.only) for s in retries)
                             if state.format == "folder" else None, True)
        dispatch(job, state, run_no, queue)
    return finish(job, state, run_no, expected, plan.skipped, plan.counts["listed"])


def _apply(job: Job, state: OutputState, plan_run: int) -> None:
    """Carry out the stored sync plan of run `plan_run` (copies, drops, manifest), then uncommit it."""
    from resnet_batch.embed import sync as syncing  # with Ray: loaded when a run gets this far
    from resnet_batch.embed.syncdiff import move_entry_pieces

    entries, drops, copies = syncing.load_plan(job.store, plan_run)
    if len(drops) or len(copies):
        job.ensure_ray()  # the copies and drops run in Ray tasks
    move_entry_pieces(job.store, plan_run)  # the new entries: manifest pieces already, moved as they are
    ledger, parts = current_ledger(job)
    records: dict[int, list[dict]] = {}
    for r in ledger.to_pylist():
        records.setdefault(r["shard"], []).append(r)
    job.ensure_ledger(state.next_run() - 1 if state.runs else 1)
    counts = syncing.apply(job.store, job.part_settings(state, state.runs[-1]["run"] if state.runs else 1),
                           state.format, state.root, state.protocol, entries, drops, copies, parts, records,
                           job.ledger.add, job.ledger.flush)
    job.ledger.flush()
    job.stats.copied += counts["copied"]
    job.stats.dropped += counts["dropped"]
    state.pending = None
    save(job.store, state)
    syncing.clear_plan(job.store)


def _retry_shards(job: Job, state: OutputState, ledger: pa.Table, done: set) -> list[Shard]:
    """--retry-failed: the failed rows of finished parts, each to be merged into the part that holds it."""
    from resnet_batch.embed.syncdiff import entries_of

    failed = ledger.filter(pc.and_(pc.greater(ledger.column("failed"), 0), pc.not_equal(ledger.column("part"), "")))
    chunks = {}
    for r in ledger.select(["shard", "chunks"]).to_pylist():
        if r["chunks"] and r["chunks"] > 0:
            chunks[r["shard"]] = r["chunks"]
    only: dict[int, dict] = {}
    for r in failed.select(["shard", "chunk", "part"]).to_pylist():
        if r["shard"] not in done:
            continue
        t = read_parquet(job.store.fs, job.store.path(r["part"]), ["image_id", "status"])
        ids = t.filter(pc.not_equal(t.column("status"), "ok")).column("image_id").to_pylist()
        only.setdefault(r["shard"], {}).update({i: r["chunk"] for i in ids})
        job.merge_chunks[(r["shard"], r["chunk"])] = chunks.get(r["shard"], -1)
    shards = []
    kind = FORMATS[state.format].shard_kind
    for piece in entries_of(job.store, set(only)):
        for shard in sorted(set(piece.column("shard").to_pylist())):
            entries = piece.filter(pc.equal(piece.column("shard"), shard))
            shards.append(shard_of(shard, kind, state.root, entries, only=only[shard]))
    return shards


def _feed(queue: ShardQueue, first: list, shards) -> None:
    """Hand shards to the scheduler as it takes them (the queue is bounded)."""
    try:
        queue.put(first)
        for shard in shards:
            queue.put([shard])
    except RunFailed:
        pass  # the run stopped
    finally:
        queue.close()
