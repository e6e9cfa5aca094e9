"""scheduler module: the driver's loop. Shards arrive from the planner (while the listing still runs), Ray Data
reads and decodes them in windows as large as the free CPUs allow, each decoded block goes to a model actor
(one on the node that decoded it when that one is not busier), the actors embed and write each chunk, and
only a small record per chunk comes back here. Nothing per image passes through the driver, and every queue is bounded, so a slow
model or store slows the reads instead of filling memory.

A shard is tried up to compute.max_attempts times: a chunk that fails (the store stayed unreachable, the
model raised, an actor or node died) makes its whole shard go round again (parts are rewritten under the
same names, so nothing is counted twice); after the last try the shard is reported, the others finish.
"""
from __future__ import annotations

import collections
import logging
import pickle
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import ray

from resnet_batch.embed.attempts import Attempts, Failure
from resnet_batch.errors import RunFailed, one_line as _one_line
from resnet_batch.embed.listing import Shard
from resnet_batch.embed.pool import ModelPool
from resnet_batch.embed.reader import ReadSettings, ShardDatasource

log = logging.getLogger(__name__)
WINDOW_SHARDS = 64  # shards per Ray Data read (a window) at least; more when the cluster has the CPUs for them
READERS = 2  # windows read at once (one finishing its last tasks while the next starts)


def window_size(free_cpus: float, decode_cpus: float, least: int = WINDOW_SHARDS) -> int:
    """Shards in the next read window: one read task per shard, as many as the free CPUs can run at once
    (the two windows together keep every free CPU busy while one of them drains), never fewer than `least`."""
    return max(least, int(free_cpus // max(decode_cpus, 1e-6)))


class ReadStats:
    """What the reads did, for the report: the peak number of read tasks running at once (from the
    start and end stamps Ray Data puts on every block, per task) and the share of blocks handed to a model
    actor on the node that decoded them."""

    def __init__(self):
        self.tasks: dict[tuple[int, int], list[float]] = {}  # (window, task) -> [start, end]
        self.blocks = 0
        self.local = 0

    def block(self, window: int, metadata) -> Optional[str]:
        """Note a block's read task; returns the node that decoded it (None when Ray Data did not say)."""
        stats = getattr(metadata, "exec_stats", None)
        if stats is None:
            return None
        if stats.start_time_s is not None and stats.end_time_s is not None:
            span = self.tasks.setdefault((window, stats.task_idx if stats.task_idx is not None else id(stats)),
                                         [stats.start_time_s, stats.end_time_s])
            span[0], span[1] = min(span[0], stats.start_time_s), max(span[1], stats.end_time_s)
        return stats.node_id

    def dispatched(self, local: bool) -> None:
        self.blocks += 1
        self.local += local

    def peak_in_flight(self) -> int:
        """The most read tasks whose [start, end] spans overlap at one moment."""
        events = sorted([(a, 1) for a, _ in self.tasks.values()] + [(b, -1) for _, b in self.tasks.values()],
                        key=lambda e: (e[0], e[1]))
        peak = cur = 0
        for _, d in events:
            cur += d
            peak = max(peak, cur)
        return peak

    def summary(self) -> dict:
        return {"read_tasks": len(self.tasks), "peak_reads_in_flight": self.peak_in_flight(),
                "blocks": self.blocks,
                "node_local_share": round(self.local / self.blocks, 3) if self.blocks else None}


class ShardQueue:
    """Shards waiting to be read: retries first, then new ones from the planner (bounded: a full queue
    blocks the planner, so the listing never runs far ahead of the work). Shards a reader has taken count
    as in hand until it has announced their window (`handed_over`): the queue is not empty before that,
    or the scheduler could finish while a reader still holds the last shards."""

    def __init__(self, maxsize: int = 4 * WINDOW_SHARDS):
        self.new: collections.deque = collections.deque()
        self.retries: collections.deque = collections.deque()
        self.maxsize = maxsize
        self.closed = False
        self.aborted = False
        self.cv = threading.Condition()
        self.added = 0
        self.in_hand = 0  # taken by a reader, window not announced yet

    def put(self, shards: list[Shard]) -> None:
        with self.cv:
            for shard in shards:
                while len(self.new) >= self.maxsize and not self.aborted:
                    self.cv.wait(0.5)
                if self.aborted:
                    raise RunFailed("the run stopped")
                self.new.append((shard, 1))
                self.added += 1
                self.cv.notify_all()

    def retry(self, shard: Shard, attempt: int) -> None:
        with self.cv:
            self.retries.append((shard, attempt))
            self.cv.notify_all()

    def close(self) -> None:
        """The planner has handed over every shard."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def abort(self) -> None:
        with self.cv:
            self.aborted = True
            self.cv.notify_all()

    def take(self, max_n: int, wait_s: float) -> list[tuple[Shard, int]]:
        """Up to max_n shards, waiting up to wait_s for the first one."""
        with self.cv:
            if not self.retries and not self.new:
                self.cv.wait(wait_s)
            out = []
            while len(out) < max_n and (self.retries or self.new):
                out.append((self.retries or self.new).popleft())
            if out:  # room for put(); never a wake-up for nothing, or idle readers would wake each other forever
                self.in_hand += len(out)
                self.cv.notify_all()
            return out

    def handed_over(self, n: int) -> None:
        """A reader has announced the window of n shards it took: the scheduler tracks them from here."""
        with self.cv:
            self.in_hand -= n
            self.cv.notify_all()

    def empty(self) -> bool:
        with self.cv:
            return self.closed and not self.new and not self.retries and not self.in_hand


class Scheduler:
    """Runs the shards of a ShardQueue to the end; `on_record(record)` gets every chunk record."""

    def __init__(self, read: ReadSettings, pool: ModelPool, *, decode_cpus: float, max_attempts: int,
                 on_record: Callable[[dict], None], on_tick: Callable[[], None] = lambda: None,
                 target_block_bytes: int = 256 << 20, window_shards: int = WINDOW_SHARDS):
        self.read, self.pool = read, pool
        self.decode_cpus, self.max_attempts = decode_cpus, max_attempts
        self.on_record, self.on_tick = on_record, on_tick
        self.target_block_bytes, self.window_shards = target_block_bytes, window_shards
        self.items: queue.Queue = queue.Queue(maxsize=pool.calls_per_actor * max(pool.max, 1) + 2)
        self.stop = threading.Event()
        self.book = Attempts(max_attempts)  # which results count, what goes round again
        self.next_window = 0
        self.window_lock = threading.Lock()
        self.waiting_blocks = 0
        self.bytes_received = 0  # what came back to the driver from the actors (records), serialized
        self.marks: dict[str, float] = {}  # perf_counter of the first window, block and dispatch
        self.reads = ReadStats()

    # -- reading (threads) -----------------------------------------------------------------------
    def _reader(self, source: ShardQueue) -> None:
        from ray.data import DataContext, ExecutionResources

        ctx = DataContext.get_current()
        ctx.max_errored_blocks = -1  # a read task that dies: its shard is retried here, not by Ray Data forever
        ctx.target_max_block_size = self.target_block_bytes  # chunks are never sliced (see reader.ChunkBuilder)
        ctx.enable_progress_bars = False
        ctx.enable_auto_log_stats = False
        ctx.print_on_execution_start = False
        ctx.execution_options.preserve_order = False
        while not self.stop.is_set():
            # Ray Data sizes its reads by the cluster; leave the model actors' CPUs to them, so a read window
            # never keeps an actor from being placed. The window follows the free CPUs (a cluster that grows
            # gets more reads at once), and so does the queue that feeds it.
            free = max(ray.cluster_resources().get("CPU", 0) - self.pool.reserved_cpus(), self.decode_cpus)
            size = window_size(free, self.decode_cpus, self.window_shards)
            source.maxsize = max(source.maxsize, READERS * 2 * size)
            taken = source.take(size, wait_s=0.5)
            if not taken:
                continue
            with self.window_lock:
                wid = self.next_window
                self.next_window += 1
                ctx.execution_options.resource_limits = ExecutionResources(cpu=free)
            self.marks.setdefault("first_window", time.perf_counter())
            if not self._put(("start", wid, taken)):
                return
            source.handed_over(len(taken))
            error = None
            try:
                # One block per read task: override_num_blocks keeps Ray Data from splitting a shard's output
                # to reach its own idea of parallelism.
                ds = ray.data.read_datasource(ShardDatasource([s for s, _ in taken], self.read),
                                              num_cpus=self.decode_cpus, override_num_blocks=len(taken))
                for bundle in ds.iter_internal_ref_bundles():
                    for i, entry in enumerate(bundle.blocks):
                        cut = bundle.slices[i] if bundle.slices else None
                        span = None if cut is None else (cut.start_offset, cut.end_offset)
                        with self.window_lock:
                            node = self.reads.block(wid, entry.metadata)
                        if not self._put(("block", wid, entry.ref, span, node)):
                            return
            except Exception as err:  # the whole window: its shards go round again
                error = f"reading failed: {type(err).__name__}: {err}"
            self._put(("end", wid, error))

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, source: ShardQueue) -> list[Failure]:
        """Until every shard is done or has failed max_attempts times; returns the failures."""
        inflight: dict = {}
        held = None
        readers = ThreadPoolExecutor(READERS, thread_name_prefix="read-window")
        futures = [readers.submit(self._reader, source) for _ in range(READERS)]
        try:
            while True:
                held = self._dispatch(held, inflight)
                # Blocks still waiting right after dispatch: every actor slot is taken.
                self.waiting_blocks = self.items.qsize() + (held is not None and held[0] == "block")
                self.pool.maybe_grow(self.waiting_blocks)
                self.pool.poll()
                refs = list(inflight) + self.pool.pending_refs()
                if refs:
                    done, _ = ray.wait(refs, num_returns=1, timeout=0.1)
                    if done:
                        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                    for ref in done:
                        if ref in inflight:
                            self._result(ref, *inflight.pop(ref))
                        elif err := self.pool.on_ready(ref):
                            if not self.pool.members:
                                raise RunFailed(f"no model actor could start: {_one_line(err)}")
                            log.warning("a model actor could not start: %s", _one_line(err))
                else:
                    time.sleep(0.02)
                self._resolve(source)
                self.on_tick()
                for f in futures:
                    if f.done() and f.exception():
                        raise f.exception()
                if source.empty() and self.book.idle() and held is None and self.items.empty() and not inflight:
                    return self.book.failures
        finally:
            self.stop.set()
            source.abort()
            readers.shutdown(wait=True, cancel_futures=True)

    def _dispatch(self, held, inflight: dict):
        while True:
            if held is None:
                try:
                    held = self.items.get_nowait()
                except queue.Empty:
                    return None
            kind, wid = held[0], held[1]
            if kind == "start":
                self.book.started(wid, held[2])
            elif kind == "end":
                self.book.read(wid, held[2])
            else:
                self.marks.setdefault("first_block", time.perf_counter())
                member = self.pool.free(node=held[4])
                if member is None:
                    return held
                self.marks.setdefault("first_dispatch", time.perf_counter())
                self.reads.dispatched(held[4] is not None and member.info.get("node") == held[4])
                self.book.sent(wid)
                inflight[self.pool.submit(member, held[2], held[3])] = (member, wid)
            held = None

    def _result(self, ref, member, wid: int) -> None:
        self.pool.done(member)
        try:
            records = ray.get(ref)
            self.bytes_received += len(pickle.dumps(records))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            self.pool.on_died(member)
            self.book.lost(wid, f"model actor lost ({_one_line(err)})")
            return
        except Exception as err:  # the block itself was lost with its node, or the call failed
            self.book.lost(wid, _one_line(err))
            return
        for record in self.book.answered(wid, records):
            self.on_record(record)

    def _resolve(self, source: ShardQueue) -> None:
        """Windows that are read and answered: their unfinished shards go round again, or fail for good."""
        for shard, attempt, reason in self.book.settle():
            log.warning("shard %d failed (try %d of %d), retrying: %s", shard.index, attempt, self.max_attempts,
                        reason)
            source.retry(shard, attempt + 1)
