"""runner module: one embed run, start to end: check, lock, plan (stream or sync), run the shards, reconcile.

The driver lists and plans, hands shards to the scheduler and keeps one small record per chunk; the reading,
decoding, embedding and writing happen in Ray tasks and actors. The run ends with the folder reconciled
against the manifest (every current image exactly once) and `_SUCCESS` only when everything balances.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import posixpath
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.cluster import init_ray, ray_logs_dir, wants_gpu
from resnet_batch.config import JobConfig, redacted
from resnet_batch.decode import PreprocessSpec, decode_table, pillow_formats
from resnet_batch.errors import InputError, OutputError, RunFailed
from resnet_batch.output.ledger import LedgerWriter, compact, read_ledger, recover, records_table
from resnet_batch.embed.listing import FORMATS, Shard, list_entries, shard_of
from resnet_batch.output.lock import OutputLock
from resnet_batch.output.manifest import MANIFEST_SCHEMA, read_manifest
from resnet_batch.embed.progress import Progress, make_progress
from resnet_batch.embed.plan import (StreamPlanner, complete_shards, detect, diff, expected_counts, layout_of, no_input,
                               pending_entries, select, todo_shards)
from resnet_batch.errors import ProvenanceMismatch
from resnet_batch.provenance import build_provenance, differences
from resnet_batch.embed.reader import CHUNK_BYTES, ReadSettings, check_passthrough_names, passthrough_fields
from resnet_batch.embed.report import RunStats, read_failures, stages
from resnet_batch.embed.scheduler import ShardQueue
from resnet_batch.schema import output_schema, with_provenance
from resnet_batch.output.state import OutputState, load, save, schema_to_text, stamp
from resnet_batch.storage import display_path, filesystem, prepare as prepare_storage
from resnet_batch.output.store import (INCOMPLETE_REPORT_FILE, LEGACY_MANIFEST, PROVENANCE_FILE, REPORT_FILE,
                                 SUCCESS_FILE, OutputStore, PartSettings, read_parquet)

log = logging.getLogger("resnet_batch")
CROP_ROW_BYTES = 224 * 224 * 3 + 512  # a decoded row in flight


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_overlap(cfg: JobConfig) -> None:
    """Input and output must be different folders, neither inside the other (a run would read its own
    parts as photos, and --fresh would delete photos)."""
    from fsspec.core import split_protocol

    def norm(uri: str) -> tuple[str, str]:
        proto, path = split_protocol(uri)
        proto = proto or "file"
        if proto in ("file", "local"):
            return "file", os.path.realpath(os.path.expanduser(path)).rstrip("/") + "/"
        return proto.replace("s3a", "s3"), path.rstrip("/") + "/"

    (pi, i), (po, o) = norm(cfg.input.uri), norm(cfg.output.uri)
    if pi == po and (i.startswith(o) or o.startswith(i)):
        what = "the input folder itself" if i == o else ("inside the input folder" if o.startswith(i)
                                                          else "a folder that holds the input")
        raise OutputError(f"output.uri {cfg.output.uri} is {what} ({cfg.input.uri}): the job would read its own "
                          "output as photos; use an output folder outside the input")


def run(cfg: JobConfig, *, fresh: bool = False, retry_failed: bool = False, progress: "Progress | bool" = False,
        verbose: bool = False, embedder: Optional[Callable] = None) -> dict:
    """Run (or resume, or sync) an embed job; returns the run report.

    Raises a UserError before any work when the configuration, input, output, weights or provenance is
    wrong, and RunFailed when shards failed every attempt (finished parts are kept). `embedder` is for
    benchmarks only (Python API): a stand-in for ResNet-50, see model.ActorSettings.
    """
    t_start = time.perf_counter()
    if not isinstance(progress, Progress):  # True: lines on stderr; False/None: nothing
        progress = make_progress(quiet=not progress, every_s=30.0)
    check_overlap(cfg)
    cfg = prepare_storage(cfg)  # storage options resolved; input readable, output writable, before any work
    store = OutputStore(cfg.output.uri, dict(cfg.output.storage_options), cfg.compute.retry_window_s)
    names = store.names()
    if LEGACY_MANIFEST in names and not fresh:
        raise OutputError(f"{store.display()} was written by resnet-batch 0.1 (one _manifest.json); this version "
                          "keeps a Parquet manifest and a part ledger: rerun with --fresh, or use another output.uri")
    with OutputLock(store, on_takeover=_say), ThreadPoolExecutor(1, thread_name_prefix="weights") as pool:
        marks: dict[str, float] = {}  # when each start-up step was done, seconds after the command began

        def timed(name, fn, *args):
            out = fn(*args)
            marks[name] = time.perf_counter() - t_start
            return out

        resolving = pool.submit(timed, "weights", _resolve_weights, cfg)  # torch imports while Ray starts
        if fresh:
            deleted = store.clear()
            if deleted:
                _say(f"--fresh: deleted {len(deleted)} files an earlier run wrote in {store.display()}")
        # Ray starts in this thread, never in a pool's: the processes it starts die with the thread that
        # started them (their parent-death signal is per thread), and the exit then waits ~25 s for them. It
        # starts when the run first needs it: a sync with nothing to do answers without it.
        start_ray = functools.partial(timed, "ray", init_ray, cfg.compute.ray_address, verbose)
        weights, state_dict = resolving.result()
        spec = PreprocessSpec.from_weights(weights.transforms)
        provenance = build_provenance(cfg, weights, spec)
        job = _Job(cfg, store, provenance, spec, state_dict, weights, t_start, marks, progress, embedder, start_ray)
        return job.run(retry_failed)


def _resolve_weights(cfg: JobConfig):
    from fsspec.core import split_protocol

    from resnet_batch.weights import resolve_weights

    options = cfg.model.storage_options
    if options is None:  # the input's credentials only go to the input's kind of store
        same = (split_protocol(cfg.model.weights)[0] or "file") == (split_protocol(cfg.input.uri)[0] or "file")
        options = dict(cfg.input.storage_options) if same else {}
    return resolve_weights(cfg.model, dict(options))


class _Job:
    """The state of one run while it lasts."""

    def __init__(self, cfg, store, provenance, spec, state_dict, weights, t_start, marks, progress, embedder,
                 start_ray):
        self.cfg, self.store, self.provenance, self.spec = cfg, store, provenance, spec
        self._start_ray = start_ray  # called once, from this (the main) thread, when Ray is first needed
        self.state_dict, self.weights = state_dict, weights
        self.t_start, self.progress, self.embedder = t_start, progress, embedder
        self.marks: dict[str, float] = marks  # start-up steps, seconds after the command began
        self.stats = RunStats()
        self.sync: dict = {}
        self.failures: list = []
        self.ledger: Optional[LedgerWriter] = None
        self.unpublished = False
        self.merge_chunks: dict[tuple[int, int], int] = {}  # --retry-failed: (shard, chunk) -> the shard's chunks
        self.done_before = 0  # images in parts that were already complete when this run started its work
        self._gpu: Optional[bool] = None  # see _use_gpu
        self.startup_s = self.pipeline_s = 0.0  # seconds to build the pool; seconds of the pipeline
        self.driver_bytes = 0  # what the shards' records brought back to the driver
        self.actor_info: dict = {}  # every actor that came up: actor id -> node, pid, device
        self.read_stats: dict = {}  # peak read tasks in flight, share of blocks embedded on their own node

    # -- the run ---------------------------------------------------------------------------------
    def run(self, retry_failed: bool) -> dict:
        cfg, store = self.cfg, self.store
        state = load(store)
        old_prov = store.read_json(PROVENANCE_FILE)
        if old_prov is not None and (diffs := differences(old_prov, self.provenance)):
            raise ProvenanceMismatch(f"output {store.display()} was written with a different setup: "
                                     + "; ".join(diffs) + "; use the earlier settings, another output.uri, or --fresh "
                                     "to start over")
        listing = list_entries(cfg.input, cfg.compute.retry_window_s)
        if state is None:
            if retry_failed:
                raise OutputError(f"--retry-failed: nothing to retry, {store.display()} holds no earlier run")
            return self._first_run(listing)
        self._check_state(state)
        return self._sync_run(state, listing, retry_failed)

    def _check_state(self, state: OutputState) -> None:
        from resnet_batch.redact import safe_uri

        if state.input != safe_uri(self.cfg.input.uri):
            raise OutputError(f"output {self.store.display()} holds a run over input {state.input!r}, not "
                              f"{safe_uri(self.cfg.input.uri)!r}; use another output.uri, or --fresh to start over")
        layout = layout_of(self.cfg.input, state.format)
        diffs = [f"input.{k}: {state.layout.get(k)!r} != {v!r}" for k, v in layout.items()
                 if state.layout.get(k) != v]
        if diffs:
            raise OutputError(f"output {self.store.display()} was made with other input settings: " + "; ".join(diffs)
                              + "; use the earlier settings, another output.uri, or --fresh to start over")

    def _first_run(self, listing) -> dict:
        """A new output: the listing streams into shards, each stored in the manifest, then run."""
        from resnet_batch.redact import safe_uri

        cfg, store = self.cfg, self.store
        fmt, pages = detect(cfg.input, listing)
        check_passthrough_names(cfg.input.passthrough_columns, fmt)
        passthrough, pages = self._passthrough(fmt, listing, pages)
        state = OutputState(safe_uri(cfg.input.uri), fmt, listing.root, listing.protocol, layout_of(cfg.input, fmt),
                            schema_to_text(tuple(passthrough)))
        run_no = state.next_run()
        state.runs.append(self._run_entry(run_no))
        store.write_json(PROVENANCE_FILE, self.provenance)
        save(store, state)
        queue = ShardQueue()
        planner = StreamPlanner(cfg.input, fmt, listing.root, pages, store, release=queue.put, close=queue.close)
        planner.start()
        self._execute(state, run_no, queue, planner=planner)
        if planner.error is not None:
            raise planner.error
        if planner.images == 0 and planner.shards == 0:
            store.remove(PROVENANCE_FILE)
            from resnet_batch.output.store import STATE_FILE

            store.remove(STATE_FILE)
            raise no_input(cfg.input, fmt, planner.listed)
        state.next_shard = planner.next_shard
        return self._finish(state, run_no, planner.expected, planner.skipped, planner.listed)

    def _passthrough(self, fmt: str, listing, pages):
        """The pass-through output columns, from the first shard file that can be read (buffered pages are
        handed on), or strings when none of the first five can."""
        names = self.cfg.input.passthrough_columns
        if fmt == "folder":
            return [], pages
        from resnet_batch.embed.listing import extension, from_raw, hidden
        from resnet_batch.embed.reader import WDS_FIELDS

        wanted = FORMATS[fmt].wanted(self.cfg.input)
        seen, candidates = [], []
        for page in pages:
            seen.append(page)
            candidates += [r for r in map(from_raw, page.column("path").to_pylist())
                           if not hidden(r) and extension(r) in wanted]
            if len(candidates) >= 5:
                break
        fs = filesystem(self.cfg.input.uri, dict(self.cfg.input.storage_options))[0]
        fields = None
        for rel in candidates[:5]:
            path = posixpath.join(listing.root, rel)
            try:
                fields = passthrough_fields(fmt, fs, path, names, self.cfg.input.extensions,
                                            self.cfg.input.image_column, display_path(listing.protocol, path))
                break
            except InputError:
                raise
            except Exception as err:
                _say(f"{display_path(listing.protocol, path)}: cannot read its columns ({type(err).__name__}: "
                     f"{err}); trying the next file")
        if fields is None:
            fields = (list(WDS_FIELDS) if fmt == "webdataset" else []) + [pa.field(n, pa.string()) for n in names]

        def again():
            yield from seen
            yield from pages

        return fields, again()

    def _sync_run(self, state: OutputState, listing, retry_failed: bool) -> dict:
        """An existing output: compare the input with the manifest (a partitioned diff: the driver holds
        counts, not rows), apply the difference, run what is left. A night with nothing to do answers
        without starting Ray."""
        from resnet_batch.embed import sync as syncing
        from resnet_batch.embed.syncdiff import entries_of, plan_sync

        cfg, store = self.cfg, self.store
        run_no = state.next_run()
        if state.pending:  # a sync that was committed but not finished: roll it forward first
            self._apply(state, state.pending["run"], syncing)
        ledger, parts = self._ledger()
        done, by_shard = complete_shards(ledger)
        t0 = time.perf_counter()
        plan = plan_sync(cfg.input, state.format, state.root, store, run_no, state.next_shard, done,
                         cfg.compute.retry_window_s, self._ray, listing=listing)
        self.sync = {**plan.counts, "partitions": plan.partitions, "plan_s": round(time.perf_counter() - t0, 3),
                     "steps_s": plan.seconds, "removed": plan.counts["deleted"]}
        state.runs.append(self._run_entry(run_no))
        expected = plan.after
        if plan.touches_output():
            self._unpublish()
            state.pending, state.next_shard = {"run": run_no}, plan.next_shard
            save(store, state)  # committed: a kill from here on is rolled forward by the next run
            self._apply(state, run_no, syncing)
            ledger, parts = self._ledger()
            done, by_shard = complete_shards(ledger)
        else:
            state.next_shard = max(state.next_shard, plan.next_shard)
            save(store, state)
        if not expected:
            raise no_input(cfg.input, state.format, plan.counts["listed"])
        todo = {s for s in expected if s not in done}
        self.done_before = sum(by_shard[s]["rows"] for s in done if s in by_shard)
        retries = self._retry_shards(state, ledger, done) if retry_failed else []
        if todo or retries:
            queue = ShardQueue()
            shards = (shard for piece in entries_of(store, todo) for shard in todo_shards(state.format, state.root,
                                                                                           piece))
            feeder = threading.Thread(target=_feed, args=(queue, retries, shards), daemon=True)
            feeder.start()
            # tar and Parquet files hold an unknown number of images until they are read
            self.progress.planned(sum(expected[s] for s in todo) + sum(len(s.only) for s in retries)
                                  if state.format == "folder" else None, True)
            self._execute(state, run_no, queue)
        return self._finish(state, run_no, expected, plan.skipped, plan.counts["listed"])

    def _apply(self, state: OutputState, plan_run: int, syncing) -> None:
        """Carry out the stored sync plan of run `plan_run` (copies, drops, manifest), then uncommit it."""
        from resnet_batch.embed.syncdiff import move_entry_pieces

        entries, drops, copies = syncing.load_plan(self.store, plan_run)
        if len(drops) or len(copies):
            self._ray()  # the copies and drops run in Ray tasks
        move_entry_pieces(self.store, plan_run)  # the new entries: manifest pieces already, moved as they are
        ledger, parts = self._ledger()
        records: dict[int, list[dict]] = {}
        for r in ledger.to_pylist():
            records.setdefault(r["shard"], []).append(r)
        self._ensure_ledger(state.next_run() - 1 if state.runs else 1)
        counts = syncing.apply(self.store, self._part_settings(state, state.runs[-1]["run"] if state.runs else 1),
                               state.format, state.root, state.protocol, entries, drops, copies, parts, records,
                               self.ledger.add)
        self.ledger.flush()
        self.stats.copied += counts["copied"]
        self.stats.dropped += counts["dropped"]
        state.pending = None
        save(self.store, state)
        syncing.clear_plan(self.store)

    def _ledger(self) -> tuple[pa.Table, dict]:
        """The ledger, with records recovered for parts that a killed driver never logged; and the parts."""
        names = self.store.names()
        parts = self.store.parts(names)
        ledger = read_ledger(self.store)
        logged = set(pc.filter(ledger.column("part"), pc.not_equal(ledger.column("part"), "")).to_pylist())
        missing = sorted(n for n in parts if n not in logged)
        if missing:
            ledger = read_ledger_with(ledger, recover(self.store, missing, self.provenance))
        present = pc.or_(pc.equal(ledger.column("part"), ""), pc.is_in(ledger.column("part"),
                                                                         pa.array(list(parts), pa.string())))
        return ledger.filter(present), parts

    def _retry_shards(self, state: OutputState, ledger: pa.Table, done: set) -> list[Shard]:
        """--retry-failed: the failed rows of finished parts, each to be merged into the part that holds it."""
        failed = ledger.filter(pc.and_(pc.greater(ledger.column("failed"), 0), pc.not_equal(ledger.column("part"), "")))
        chunks = {}
        for r in ledger.select(["shard", "chunks"]).to_pylist():
            if r["chunks"] and r["chunks"] > 0:
                chunks[r["shard"]] = r["chunks"]
        only: dict[int, dict] = {}
        for r in failed.select(["shard", "chunk", "part"]).to_pylist():
            if r["shard"] not in done:
                continue
            t = read_parquet(self.store.fs, self.store.path(r["part"]), ["image_id", "status"])
            ids = t.filter(pc.not_equal(t.column("status"), "ok")).column("image_id").to_pylist()
            only.setdefault(r["shard"], {}).update({i: r["chunk"] for i in ids})
            self.merge_chunks[(r["shard"], r["chunk"])] = chunks.get(r["shard"], -1)
        from resnet_batch.embed.syncdiff import entries_of

        shards = []
        kind = FORMATS[state.format].shard_kind
        for piece in entries_of(self.store, set(only)):
            for shard in sorted(set(piece.column("shard").to_pylist())):
                entries = piece.filter(pc.equal(piece.column("shard"), shard))
                shards.append(shard_of(shard, kind, state.root, entries, only=only[shard]))
        return shards

    def _ray(self) -> None:
        """Start (or join) Ray the first time the run needs it."""
        import ray

        if not ray.is_initialized():
            self._start_ray()

    # -- running shards --------------------------------------------------------------------------
    def _ensure_ledger(self, run_no: int) -> None:
        if self.ledger is None:
            self.ledger = LedgerWriter(self.store, run_no)

    def _unpublish(self) -> None:
        if not self.unpublished:
            self.store.unpublish()
            self.unpublished = True

    def _read_settings(self, fmt: str, root: str, protocol: str, passthrough) -> ReadSettings:
        c, i = self.cfg.compute, self.cfg.input
        formats = pillow_formats(i.extensions)
        if c.gpu_decode and self._use_gpu():
            from resnet_batch.embed.gpu_decode import probe_table

            decode = functools.partial(probe_table, max_pixels=i.max_pixels, formats=formats)
            chunk_bytes = CHUNK_BYTES
        else:
            decode = functools.partial(decode_table, spec=self.spec, max_pixels=i.max_pixels, draft=i.jpeg_draft,
                                       formats=formats)
            chunk_bytes = max(CHUNK_BYTES, i.images_per_shard * CROP_ROW_BYTES)
        return ReadSettings(root, protocol, i.uri, dict(i.storage_options), tuple(i.extensions), i.image_column,
                            tuple(passthrough), i.max_bytes, i.images_per_shard, c.decode_batch_size,
                            c.retry_window_s, decode, chunk_bytes)

    def _use_gpu(self) -> bool:
        """Whether the model actors ask for GPUs; decided once, when the cluster is first asked."""
        if self._gpu is None:
            import ray

            gpus = ray.cluster_resources().get("GPU", 0)
            self._gpu = wants_gpu(self.cfg.compute.device, gpus)
            if self._gpu and not gpus:
                _say("compute.device=cuda: no GPU in the cluster yet; the model actors wait for the autoscaler to "
                     "add GPU nodes")
        return self._gpu

    def _part_settings(self, state: OutputState, run_no: int) -> PartSettings:
        schema = with_provenance(output_schema(state.passthrough_fields, self.cfg.output.embedding_dtype),
                                 self.provenance)
        o = self.cfg.output
        return PartSettings(o.uri, dict(o.storage_options), schema, None if o.compression == "none" else o.compression,
                            o.embedding_dtype, self.cfg.compute.retry_window_s, run_no)

    def _execute(self, state: OutputState, run_no: int, queue: ShardQueue,
                 planner: Optional[StreamPlanner] = None) -> None:
        import ray

        from resnet_batch.embed.model import ActorSettings
        from resnet_batch.embed.pool import ModelPool
        from resnet_batch.embed.scheduler import Scheduler
        from resnet_batch.weights import categories

        cfg, c = self.cfg, self.cfg.compute
        self._ray()
        self._unpublish()
        self._ensure_ledger(run_no)
        t0 = time.perf_counter()
        use_gpu = self._use_gpu()
        read = self._read_settings(state.format, state.root, state.protocol, state.passthrough_fields)
        actor = ActorSettings(
            spec=self.spec, categories=categories(self.weights.transforms),
            topk=cfg.model.topk, precision=cfg.model.precision, channels_last=cfg.model.channels_last,
            compile=cfg.model.compile, use_gpu=use_gpu, require_cuda=c.device == "cuda",
            threads=c.torch_threads or max(1, math.ceil(c.cpus_per_actor)), batch_size=c.batch_size,
            max_pixels=cfg.input.max_pixels, draft=cfg.input.jpeg_draft,
            formats=pillow_formats(cfg.input.extensions), output=self._part_settings(state, run_no),
            layout=self.weights.layout, embedder=self.embedder)
        self.marks["pool"] = time.perf_counter() - self.t_start
        pool = ModelPool(actor, ray.put(self.state_dict), min_actors=c.min_actors, max_actors=c.max_actors, num_cpus=c.cpus_per_actor,
                         num_gpus=c.gpus_per_actor if use_gpu else 0)
        self.stats.t0 = t0
        self.startup_s = time.perf_counter() - t0

        def on_record(record: dict) -> None:
            if (record["shard"], record["chunk"]) in self.merge_chunks:
                record["chunks"] = self.merge_chunks[(record["shard"], record["chunk"])]
            self.ledger.add(record)
            self.stats.absorb(record)

        def on_tick() -> None:
            if planner is not None:
                self.progress.planned(planner.images if state.format == "folder" else None, planner.done.is_set())
            self.progress.update(self.stats, scheduler.waiting_blocks, pool.ready_count())
            self.ledger.tick()

        scheduler = Scheduler(read, pool, decode_cpus=c.decode_cpus, max_attempts=c.max_attempts,
                              on_record=on_record, on_tick=on_tick, target_block_bytes=2 * read.chunk_bytes + (16 << 20))
        try:
            self.failures = scheduler.run(queue)
        finally:
            self.marks.update({k: v - self.t_start for k, v in scheduler.marks.items()})
            if pool.first_ready is not None:
                self.marks["first_actor_ready"] = pool.first_ready - self.t_start
            if self.stats.first:
                self.marks["first_result"] = self.stats.first[0] - self.t_start
            self.driver_bytes = scheduler.bytes_received
            self.read_stats = scheduler.reads.summary()
            self.pipeline_s = time.perf_counter() - t0
            self.ledger.flush()
            self.progress.close()
            self.actor_info = dict(pool.seen)
            pool.shutdown()

    # -- the end ---------------------------------------------------------------------------------
    def _finish(self, state: OutputState, run_no: int, expected: dict[int, int], skipped, listed: int) -> dict:
        """Reconcile the folder with the manifest, write the report, _SUCCESS only when everything balances."""
        store = self.store
        if self.ledger is not None:
            self.ledger.flush()
        ledger, parts = self._ledger()
        done, by_shard = complete_shards(ledger)
        stale = [n for n, (s, _) in parts.items() if s not in expected]
        for n in stale:  # parts of shards the manifest no longer has (an interrupted sync's leftovers)
            store.remove(n)
        missing = sorted(s for s in expected if s not in done)
        kinds = FORMATS[state.format]
        mismatched = [f"shard {s}: {by_shard[s]['rows']} rows for {n} files" for s, n in expected.items()
                      if kinds.name == "folder" and s in done and by_shard[s]["rows"] != n]
        totals = {k: sum(by_shard[s][k] for s in expected if s in by_shard) for k in ("rows", "ok", "failed",
                                                                                      "skipped")}
        skipped_total = skipped.count + totals["skipped"]
        complete = not missing and not mismatched and not self.failures
        report = self._report(state, run_no, complete, totals, skipped, skipped_total, expected, missing, mismatched,
                              ledger)
        if complete:
            store.write_json(REPORT_FILE, report)
            store.write_json(SUCCESS_FILE, {"inputs": report["counts"]["inputs"], "ok": totals["ok"],
                                            "failed": totals["failed"], "skipped": skipped_total})
            store.remove(INCOMPLETE_REPORT_FILE)
        else:
            store.write_json(INCOMPLETE_REPORT_FILE, report)
        entry = state.run(run_no)
        entry.update(finished=stamp(), status="complete" if complete else "incomplete",
                     embedded=self.stats.images, failed=self.stats.failed, reused=self.sync.get("reused", 0),
                     removed=self.sync.get("removed", 0), wall_s=report["seconds"]["wall"],
                     img_per_s=report["img_per_s"])
        save(store, state)
        compact(store, run_no)
        if self.failures:
            names = "; ".join(f"shard {f.shard.index} ({_shard_desc(f.shard, state)}): {f.reason}"
                              for f in self.failures[:5])
            err = RunFailed(f"{len(self.failures)} shard(s) failed {self.cfg.compute.max_attempts} times: {names}")
            err.report = report
            raise err
        return report

    def _run_entry(self, run_no: int) -> dict:
        m = self.cfg.model
        return {"run": run_no, "started": stamp(), "status": "running", "host": socket.gethostname(),
                "pid": os.getpid(), "weights_id": self.provenance["weights_id"], "precision": m.precision,
                "embedding_dtype": self.cfg.output.embedding_dtype}

    def _report(self, state, run_no, complete, totals, skipped, skipped_total, expected, missing, mismatched,
                ledger) -> dict:
        st = self.stats
        wall = time.perf_counter() - self.t_start
        pipeline, actors = self.pipeline_s, self.actor_info
        first = (st.first[0] - st.t0) if st.first else 0.0
        report = {
            "output": self.store.display(),
            "output_arg": self.cfg.output.uri if "://" in self.cfg.output.uri else self.store.display(),
            "complete": complete,
            "run": run_no,
            "counts": {"inputs": totals["rows"] + skipped_total, "ok": totals["ok"], "failed": totals["failed"],
                       "skipped": skipped_total, "done_before": self.done_before,
                       "this_run": {"images": st.images, "ok": st.ok, "failed": st.failed}},
            "shards": {"total": len(expected), "parts_written": st.parts, "missing": missing[:20],
                       "mismatched": mismatched[:20]},
            "sync": self.sync,
            "skipped_files": skipped.examples,
            "startup": {k: round(v, 3) for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])},
            "seconds": {"wall": round(wall, 3), "startup": round(self.startup_s, 3),
                        "first_result": round(first, 3), "pipeline": round(pipeline, 3)},
            "img_per_s": round(st.images / pipeline, 2) if pipeline and st.images else None,
            "steady_img_per_s": round(v, 2) if (v := st.steady_img_per_s()) else None,
            "device": st.devices(),
            "gpu_requested": bool(self._gpu),
            "actors": _actors(actors, st.actors),
            "stages": stages(st, max(len(actors), len(st.actors), 1)),
            "per_node": st.per_node(),
            "reads": self.read_stats,
            "driver": {"pid": os.getpid(), "host": socket.gethostname(), "peak_rss_bytes": _peak_rss(),
                       "bytes_received": self.driver_bytes,
                       "bytes_per_image": round(self.driver_bytes / st.images, 2) if st.images else None},
            "failures": read_failures(self.store, ledger),
            "ray_logs": ray_logs_dir(),
            "failed_shards": [{"shard": f.shard.index, "attempts": f.attempts, "reason": f.reason,
                               "what": _shard_desc(f.shard, state)} for f in self.failures],
            "provenance": self.provenance,
            "config": redacted(self.cfg),
        }
        return report


def _actors(started: dict, worked: dict) -> list[dict]:
    """Every model actor that came up (those that got no work too), with what it did."""
    out = {k: {"node": i["node"], "pid": i["pid"], "device": i["device"], "images": 0, "parts": 0}
           for k, i in started.items()}
    for k, a in worked.items():
        out[k] = {f: a[f] for f in ("node", "pid", "device", "images", "parts")}
    return [{"actor": k, **v} for k, v in sorted(out.items())]


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


def _peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _shard_desc(shard: Shard, state: OutputState) -> str:
    from resnet_batch.embed.listing import relative_id

    first = relative_id(shard.paths[0], state.root) if shard.paths else "?"
    return first if len(shard.paths) == 1 else f"{len(shard.paths)} files from {first}"


def _keys(table: pa.Table) -> pa.Array:
    """shard + NUL + path, for matching manifest entries."""
    return pc.binary_join_element_wise(pc.cast(pc.cast(table.column("shard"), pa.string()), pa.binary()),
                                       table.column("path"), pa.scalar(b"\x00"))


def read_ledger_with(ledger: pa.Table, records: list[dict]) -> pa.Table:
    from resnet_batch.output.ledger import latest

    return latest(pa.concat_tables([ledger, records_table(records)]))
