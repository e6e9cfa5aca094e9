"""runner module: one embed run, start to end: check, lock, start Ray and load the weights, then plan (a first
run or a sync), dispatch the shards, reconcile and report.

The driver lists and plans, hands shards to the scheduler and keeps one small record per chunk; the reading,
decoding, embedding and writing happen in Ray tasks and actors. The run ends with the folder reconciled
against the manifest (every current image exactly once) and `_SUCCESS` only when everything balances.
Each step has its module: first_run and sync_run (what to do), dispatch (the pipeline), reconcile and report
(the end); job holds what they share.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Callable, Optional

from resnet_batch.cluster import init_ray, quiet_ray_data
from resnet_batch.config import JobConfig
from resnet_batch.decode import PreprocessSpec
from resnet_batch.embed.dispatch import early_actors
from resnet_batch.embed.first_run import first_run
from resnet_batch.embed.job import Job
from resnet_batch.embed.listing import list_entries
from resnet_batch.embed.plan import input_layout
from resnet_batch.embed.progress import Progress, make_progress
from resnet_batch.embed.sync_run import sync_run
from resnet_batch.errors import OutputError
from resnet_batch.output.lock import OutputLock
from resnet_batch.output.state import OutputState, load
from resnet_batch.output.store import LEGACY_MANIFEST, LOCK_FILE, PROVENANCE_FILE, OutputStore
from resnet_batch.provenance import build_provenance, check_compatible
from resnet_batch.storage import prepare as prepare_storage

log = logging.getLogger(__name__)


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
    if fresh:  # a folder that is not an output is refused before anything is written there or loaded
        store.check_clearable(names=names)
    if LEGACY_MANIFEST in names and not fresh:
        raise OutputError(f"{store.display()} was written by resnet-batch 0.1 (one _manifest.json); this version "
                          "keeps a Parquet manifest and a part ledger: rerun with --fresh, or use another output.uri")
    with OutputLock(store, on_takeover=log.warning, on_lost=log.error) as lock:
        marks: dict[str, float] = {}  # when each start-up step was done, seconds after the command began
        if not fresh and store.remove_temp_files(names):  # a write cut short by a kill (--fresh clears them too)
            log.info(f"removed the temporary files of an interrupted write in {store.display()}")

        def timed(name, fn, *args, **kwargs):
            out = fn(*args, **kwargs)
            marks[name] = time.perf_counter() - t_start
            return out

        if fresh:
            deleted = [n for n in store.clear() if n != LOCK_FILE]  # the lock is this run's own, kept
            if deleted:
                log.info(f"--fresh: deleted {len(deleted)} files an earlier run wrote in {store.display()}")
        # Ray starts in this thread, never in a pool's: the processes it starts die with the thread that
        # started them (their parent-death signal is per thread), and the exit then waits ~25 s for them. A
        # first run starts it at once; a sync when it first needs it (a sync with nothing to do answers
        # without it).
        start_ray = functools.partial(timed, "ray", init_ray, cfg.compute.ray_address, verbose)
        gpu, early = None, []  # a first run's model actors, started before the weights are loaded
        try:
            if load(store) is None:  # a first run needs Ray: it starts now, and its model actors with it
                # Before torch loads here: an import holds this process's GIL, and Ray's start beside torch's
                # import in a thread takes 1.7 s longer (benchmarks/start_costs.py). Ray Data's import comes after the
                # actors are asked for, and torch's after that: the actors' processes start meanwhile.
                start_ray(ray_data=False)
                gpu, early = timed("actors", early_actors, cfg, embedder)
                quiet_ray_data(verbose)
            weights, state_dict = timed("weights", _resolve_weights, cfg)
            log.debug("start-up: " + ", ".join(f"{k} ready at {v:.1f} s" for k, v in marks.items()))
            spec = PreprocessSpec.from_weights(weights.transforms)
            provenance = build_provenance(cfg, weights, spec)
            job = Job(cfg=cfg, store=store, provenance=provenance, spec=spec, state_dict=state_dict,
                      weights=weights, t_start=t_start, marks=marks, progress=progress, embedder=embedder,
                      start_ray=start_ray, lock_check=lock.check, gpu=gpu, early_actors=early)
            return _start(job, retry_failed)
        finally:
            if early:  # the run ended before its pool took them (a refusal, an empty input)
                from resnet_batch.embed.pool import stop_actors

                stop_actors(early)


def _resolve_weights(cfg: JobConfig):
    from fsspec.core import split_protocol

    from resnet_batch.weights import resolve_weights

    options = cfg.model.storage_options
    if options is None:  # the input's credentials only go to the input's kind of store
        same = (split_protocol(cfg.model.weights)[0] or "file") == (split_protocol(cfg.input.uri)[0] or "file")
        options = dict(cfg.input.storage_options) if same else {}
    return resolve_weights(cfg.model, dict(options))


def _start(job: Job, retry_failed: bool) -> dict:
    """The output's provenance and state checked against this run, the input listed, then a first run or a sync."""
    cfg, store = job.cfg, job.store
    state = load(store)
    old_prov = store.read_json(PROVENANCE_FILE)
    if old_prov is not None:
        check_compatible(old_prov, job.provenance, f"output {store.display()} was written with a different setup",
                         hint="; use the earlier settings, another output.uri, or --fresh to start over")
    listing = list_entries(cfg.input, cfg.compute.retry_window_s)
    if state is None:
        if retry_failed:
            raise OutputError(f"--retry-failed: nothing to retry, {store.display()} holds no earlier run")
        return first_run(job, listing)
    _check_state(job, state)
    return sync_run(job, state, listing, retry_failed)


def _check_state(job: Job, state: OutputState) -> None:
    from resnet_batch.redact import safe_uri

    if state.input != safe_uri(job.cfg.input.uri):
        raise OutputError(f"output {job.store.display()} holds a run over input {state.input!r}, not "
                          f"{safe_uri(job.cfg.input.uri)!r}; use another output.uri, or --fresh to start over")
    layout = input_layout(job.cfg.input, state.format)
    diffs = [f"input.{k}: {state.layout.get(k)!r} != {v!r}" for k, v in layout.items()
             if state.layout.get(k) != v]
    if diffs:
        raise OutputError(f"output {job.store.display()} was made with other input settings: " + "; ".join(diffs)
                          + "; use the earlier settings, another output.uri, or --fresh to start over")
