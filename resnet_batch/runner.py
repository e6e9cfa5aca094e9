"""runner module: plan the run (resume, retry), build the Ray Data pipeline, stream results to the writer."""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.config import JobConfig, redacted
from resnet_batch.decode import PreprocessSpec, decode_table
from resnet_batch.listing import Listing, Shard, list_input
from resnet_batch.provenance import build_provenance, check_compatible
from resnet_batch.reader import SHARD_END, ShardDatasource, extra_fields
from resnet_batch.report import RunStats, finalize
from resnet_batch.schema import output_schema, with_provenance
from resnet_batch.storage import prepare as prepare_storage
from resnet_batch.writer import MANIFEST_FILE, PROVENANCE_FILE, OutputError, OutputStore, failed_ids


@dataclass
class Plan:
    """What this invocation will do: the full shard list, and the shards (or images) to (re)process."""

    listing: Listing
    todo: list[Shard]
    only: Optional[dict[int, frozenset]] = None  # --retry-failed: shard -> failed image_ids
    done_before: int = 0


@dataclass
class _Pending:
    tables: list = field(default_factory=list)
    rows: int = 0
    expected: Optional[int] = None
    skipped: int = 0


# Input settings that shape the shards and the output columns, by format: a resume must use the same ones.
LAYOUT_KEYS = {"folder": ("format", "extensions", "images_per_shard", "limit"),
               "webdataset": ("format", "extensions", "passthrough_columns"),
               "parquet": ("format", "image_column", "passthrough_columns")}


def _layout(cfg: JobConfig) -> dict:
    keys = {k for ks in LAYOUT_KEYS.values() for k in ks}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.input.model_dump(include=keys).items()}


def _listing_to_manifest(listing: Listing, cfg: JobConfig) -> dict:
    return {"input": cfg.input.uri, "layout": _layout(cfg),
            "format": listing.format, "root": listing.root, "protocol": listing.protocol,
            "images": listing.images, "skipped": listing.skipped,
            "shards": [{"index": s.index, "kind": s.kind, "paths": list(s.paths)} for s in listing.shards]}


def _manifest_to_listing(m: dict) -> Listing:
    shards = [Shard(s["index"], s["kind"], tuple(s["paths"])) for s in m["shards"]]
    return Listing(m["root"], m["protocol"], m["format"], shards, m["skipped"], m["images"])


def plan_run(cfg: JobConfig, store: OutputStore, provenance: dict, *, fresh: bool, retry_failed: bool,
             progress: bool = True) -> Plan:
    """Decide what to (re)do. A new output is listed and stamped; an existing one is resumed or refused."""
    if fresh:
        store.clear()
    if store.exists():
        check_compatible(store.read_json(PROVENANCE_FILE), provenance, f"output {store.display()}")
        manifest = store.read_json(MANIFEST_FILE)
        if manifest is None:
            raise OutputError(f"output {store.display()} has {PROVENANCE_FILE} but no {MANIFEST_FILE}; "
                              "rerun with --fresh to start over")
        if manifest["input"] != cfg.input.uri:
            raise OutputError(f"output {store.display()} holds a run over input {manifest['input']!r}, "
                              f"not {cfg.input.uri!r}; use another output.uri or --fresh")
        layout = _layout(cfg)
        diffs = [f"input.{k}: {manifest['layout'].get(k)!r} != {layout[k]!r}" for k in LAYOUT_KEYS[manifest["format"]]
                 if manifest["layout"].get(k) != layout[k]]
        if diffs:
            raise OutputError(f"output {store.display()} was planned with other input settings: " + "; ".join(diffs)
                              + "; use the earlier settings, another output.uri, or --fresh")
        listing = _manifest_to_listing(manifest)
    else:
        if retry_failed:
            raise OutputError(f"--retry-failed: nothing to retry, {store.display()} holds no earlier run")
        listing = list_input(cfg.input, progress=progress)
        store.write_json(MANIFEST_FILE, _listing_to_manifest(listing, cfg))
        store.write_json(PROVENANCE_FILE, provenance)
    done = store.done_parts()
    todo = [s for s in listing.shards if store.part_name(s.index) not in done]
    plan = Plan(listing, todo, done_before=len(listing.shards) - len(todo))
    if retry_failed:
        plan.only = {s.index: None for s in todo}  # unfinished shards run whole
        for s in listing.shards:
            if store.part_name(s.index) in done and store.part_stats(store.part_name(s.index)).get("failed", 0):
                ids = failed_ids(store.read_part(s.index, ["image_id", "status"]))
                if ids:
                    plan.only[s.index] = ids
                    plan.todo.append(s)
    return plan


def _resolve_weights(cfg: JobConfig):
    from resnet_batch.weights import resolve_weights

    return resolve_weights(cfg.model, dict(cfg.input.storage_options))


def init_ray(address: Optional[str]) -> None:
    """Connect to the given cluster (else RAY_ADDRESS), or start a local Ray; no-op when already connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def wants_gpu(device: str, cluster_gpus: float) -> bool:
    """Whether the model actors ask Ray for GPUs (compute.device; `auto` looks at the cluster now)."""
    return device == "cuda" or (device == "auto" and cluster_gpus > 0)


def build_dataset(cfg: JobConfig, plan: Plan, spec: PreprocessSpec, extra: list, state_dict_ref,
                  labels: tuple[str, ...], use_gpu: bool):
    """read + decode shards (CPU tasks) -> ResNet-50 actor pool."""
    import ray

    c = cfg.compute
    decode = functools.partial(decode_table, spec=spec, max_pixels=cfg.input.max_pixels, draft=cfg.input.jpeg_draft)
    if c.gpu_decode and use_gpu:  # the read tasks only probe headers; the actors decode JPEGs with nvJPEG
        from resnet_batch.gpu_decode import probe_table

        decode = functools.partial(probe_table, max_pixels=cfg.input.max_pixels)
    elif c.gpu_decode:
        _log("compute.gpu_decode: the model actors run without a GPU, decoding on the CPUs")
    source = ShardDatasource(cfg.input, plan.listing, plan.todo, extra, chunk=c.decode_batch_size, decode=decode,
                             only=plan.only)
    ds = ray.data.read_datasource(source, num_cpus=c.decode_cpus)
    threads = c.torch_threads or max(1, math.ceil(c.cpus_per_actor))
    from resnet_batch.model import EmbedActor

    return ds.map_batches(
        EmbedActor,
        fn_constructor_args=(state_dict_ref, spec, labels, cfg.model.topk, cfg.model.precision,
                             cfg.model.channels_last, cfg.model.compile, use_gpu, threads),
        fn_constructor_kwargs={"require_cuda": c.device == "cuda",  # no CUDA in torch: fail, not run on the CPU
                               "decode_opts": {"max_pixels": cfg.input.max_pixels, "draft": cfg.input.jpeg_draft},
                               "warmup_batch": c.batch_size if use_gpu else 0},  # cudnn autotuning
        batch_size=c.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=c.min_actors, max_size=c.max_actors),
        num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor if use_gpu else 0,
    )


def run(cfg: JobConfig, *, fresh: bool = False, retry_failed: bool = False, progress: bool = True) -> dict:
    """Run (or resume) an embed job; returns the run report. Raises on configuration or output errors."""
    t_start = time.perf_counter()
    cfg = prepare_storage(cfg)  # storage options resolved; input readable, output writable, before any work
    store = OutputStore(cfg.output.uri, dict(cfg.output.storage_options), cfg.output.compression)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights") as pool:
        resolving = pool.submit(_resolve_weights, cfg)  # imports torch: overlaps with Ray's start
        if fresh or retry_failed or not store.published():
            init_ray(cfg.compute.ray_address)  # Ray starts while the weights load; a finished output needs no Ray at all
        weights, state_dict = resolving.result()
    spec = PreprocessSpec.from_weights(weights.transforms)
    provenance = build_provenance(cfg, weights, spec)
    plan = plan_run(cfg, store, provenance, fresh=fresh, retry_failed=retry_failed, progress=progress)
    extra = extra_fields(cfg.input, plan.listing)
    schema = with_provenance(output_schema(extra), provenance)
    stats = RunStats(shards_total=len(plan.listing.shards), shards_before=plan.done_before)
    _log(f"input {cfg.input.uri}: {plan.listing.format}, {len(plan.listing.shards)} shards"
         f"{f', {plan.listing.images} images' if plan.listing.images is not None else ''}, "
         f"{len(plan.listing.skipped)} non-image files skipped; {plan.done_before} shards already done, "
         f"{len(plan.todo)} to do")
    if plan.todo:
        store.unpublish()
        store.remove_temp_files()
        _execute(cfg, plan, spec, extra, schema, state_dict, weights, store, stats, progress)
    stats.wall_s = time.perf_counter() - t_start
    return finalize(cfg, store, plan.listing, provenance, stats, redacted(cfg))


def _execute(cfg, plan, spec, extra, schema, state_dict, weights, store, stats, progress) -> None:
    import ray
    from ray.data import DataContext

    t0 = time.perf_counter()
    init_ray(cfg.compute.ray_address)  # usually already started by run(); not when a published output lost a part
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.execution_options.preserve_order = False
    from resnet_batch.weights import categories

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = stats.gpu_requested = wants_gpu(cfg.compute.device, cluster_gpus)
    if use_gpu and not cluster_gpus:
        _log("compute.device=cuda: no GPU in the cluster yet; the model actors wait for the autoscaler to add GPU nodes")
    ds = build_dataset(cfg, plan, spec, extra, ray.put(state_dict), categories(weights.transforms), use_gpu)
    stats.startup_s = time.perf_counter() - t0
    shards = {s.index: s for s in plan.todo}
    pending: dict[int, _Pending] = {}
    writes: list[Future] = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="write") as pool:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
            stats.absorb(table, time.perf_counter())
            for s in pc.unique(table.column("_shard")).to_pylist():
                part = table.filter(pc.equal(table.column("_shard"), s))
                p = pending.setdefault(s, _Pending())
                ends = pc.equal(part.column("status"), SHARD_END)
                end_rows = part.filter(ends)
                if len(end_rows):
                    p.expected = end_rows.column("_count")[0].as_py()
                    p.skipped = end_rows.column("_skipped")[0].as_py()
                rows = part.filter(pc.invert(ends))
                if len(rows):
                    p.tables.append(rows)
                    p.rows += len(rows)
                if p.expected is not None and p.rows == p.expected:
                    del pending[s]  # complete: assembled and written in a writer thread, off this loop
                    writes.append(pool.submit(_write, store, shards[s], p, plan, schema, stats))
            writes = _pending_writes(writes)
            stats.report_progress(progress)
        for w in writes:
            w.result()
    stats.pipeline_s = time.perf_counter() - t0
    if (first := stats.first_result_at()) is not None:
        stats.first_result_s = first - t0
    if pending:
        raise RuntimeError(f"pipeline ended with {len(pending)} incomplete shards: {sorted(pending)[:10]}")


def _merge(store: OutputStore, shard: Shard, p: _Pending, plan: Plan, schema: pa.Schema) -> pa.Table:
    """A shard's new rows; for --retry-failed, folded into the part's earlier rows (each image once)."""
    new = pa.concat_tables([t.select(schema.names) for t in p.tables]) if p.tables else schema.empty_table()
    only = plan.only.get(shard.index) if plan.only else None
    if only is None:
        return new
    old = store.read_part(shard.index)
    keep = old.filter(pc.invert(pc.is_in(old.column("image_id"), pa.array(list(only)))))
    return pa.concat_tables([keep.select(schema.names).cast(schema), new.cast(schema)])


def _write(store: OutputStore, shard: Shard, p: _Pending, plan: Plan, schema: pa.Schema, stats) -> None:
    t0 = time.perf_counter()
    table = _merge(store, shard, p, plan, schema)
    status = table.column("status").to_numpy(zero_copy_only=False)
    part_stats = {"rows": len(table), "ok": int((status == "ok").sum()), "failed": int((status != "ok").sum()),
                  "skipped": p.skipped}
    store.write_part(shard, table, schema, part_stats)
    stats.wrote_part(time.perf_counter() - t0)


def _pending_writes(writes: list[Future]) -> list[Future]:
    """Raise the first failed part write; return the writes still running."""
    for w in writes:
        if w.done():
            w.result()
    return [w for w in writes if not w.done()]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
