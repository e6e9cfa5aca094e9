"""dispatch module: the shards of a run through the Ray pipeline: read settings, the model pool, the scheduler,
and the per-chunk records into the ledger and the run's counters."""
from __future__ import annotations

import functools
import logging
import math
import time
from typing import TYPE_CHECKING, Optional

from resnet_batch.cluster import wants_gpu, worker_uri
from resnet_batch.decode import decode_table, pillow_formats
from resnet_batch.embed.job import Job
from resnet_batch.output.state import OutputState

if TYPE_CHECKING:  # Ray, Ray Data and torch load when a run first needs them, not with the command
    from resnet_batch.embed.plan import StreamPlanner
    from resnet_batch.embed.reader import ReadSettings
    from resnet_batch.embed.scheduler import ShardQueue

log = logging.getLogger(__name__)
CROP_ROW_BYTES = 224 * 224 * 3 + 512  # a decoded row in flight


def dispatch(job: Job, state: OutputState, run_no: int, queue: ShardQueue,
             planner: Optional[StreamPlanner] = None) -> None:
    """Run every shard the queue hands out (until it closes); failures end in `job.failures`."""
    import ray

    from resnet_batch.embed.model import ActorSettings
    from resnet_batch.embed.pool import ModelPool
    from resnet_batch.embed.scheduler import Scheduler
    from resnet_batch.weights import categories

    cfg, c = job.cfg, job.cfg.compute
    job.ensure_ray()
    job.unpublish()
    job.ensure_ledger(run_no)
    t0 = time.perf_counter()
    gpu = use_gpu(job)
    read = read_settings(job, state.root, state.protocol, state.passthrough_fields)
    actor = ActorSettings(
        spec=job.spec, categories=categories(job.weights.transforms),
        topk=cfg.model.topk, precision=cfg.model.precision, channels_last=cfg.model.channels_last,
        compile=cfg.model.compile, use_gpu=gpu, require_cuda=c.device == "cuda",
        threads=c.torch_threads or max(1, math.ceil(c.cpus_per_actor)), batch_size=c.batch_size,
        max_pixels=cfg.input.max_pixels, draft=cfg.input.jpeg_draft,
        formats=pillow_formats(cfg.input.extensions), output=job.part_settings(state, run_no),
        layout=job.weights.layout, embedder=job.embedder)
    job.marks["pool"] = time.perf_counter() - job.t_start
    started = list(job.early_actors)  # a first run's actors, asked for when Ray came up (early_actors)
    job.early_actors.clear()
    pool = ModelPool(actor, ray.put(job.state_dict), min_actors=c.min_actors, max_actors=c.max_actors,
                     num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor if gpu else 0, started=started)
    job.stats.t0 = t0
    job.startup_s = time.perf_counter() - t0

    def on_record(record: dict) -> None:
        if (record["shard"], record["chunk"]) in job.merge_chunks:
            record["chunks"] = job.merge_chunks[(record["shard"], record["chunk"])]
        job.ledger.add(record)
        job.stats.absorb(record)

    def on_tick() -> None:
        job.lock_check()  # a lost lock stops the run here: no more work is handed out
        if planner is not None:
            job.progress.planned(planner.images if state.format == "folder" else None, planner.done.is_set())
        job.progress.update(job.stats, scheduler.waiting_blocks, pool.ready_count())
        job.ledger.tick()

    scheduler = Scheduler(read, pool, decode_cpus=c.decode_cpus, max_attempts=c.max_attempts,
                          on_record=on_record, on_tick=on_tick, target_block_bytes=2 * read.chunk_bytes + (16 << 20))
    try:
        job.failures = scheduler.run(queue)
    finally:
        job.marks.update({k: v - job.t_start for k, v in scheduler.marks.items()})
        if pool.first_ready is not None:
            job.marks["first_actor_ready"] = pool.first_ready - job.t_start
        if job.stats.first:
            job.marks["first_result"] = job.stats.first[0] - job.t_start
        job.driver_bytes = scheduler.bytes_received
        job.read_stats = scheduler.reads.summary()
        job.pipeline_s = time.perf_counter() - t0
        try:
            job.ledger.flush()  # raises LockLost when the output is no longer this run's: the pool still stops
        finally:
            job.progress.close()
            job.actor_info = dict(pool.seen)
            pool.shutdown()


def read_settings(job: Job, root: str, protocol: str, passthrough) -> ReadSettings:
    """How the read tasks list, read and decode a shard (decoded on the GPU actors with compute.gpu_decode)."""
    from resnet_batch.embed.reader import CHUNK_BYTES, ReadSettings

    c, i = job.cfg.compute, job.cfg.input
    formats = pillow_formats(i.extensions)
    if c.gpu_decode and use_gpu(job):
        from resnet_batch.embed.gpu_decode import probe_table

        decode = functools.partial(probe_table, max_pixels=i.max_pixels, formats=formats)
        chunk_bytes = CHUNK_BYTES
    else:
        decode = functools.partial(decode_table, spec=job.spec, max_pixels=i.max_pixels, draft=i.jpeg_draft,
                                   formats=formats)
        chunk_bytes = max(CHUNK_BYTES, i.images_per_shard * CROP_ROW_BYTES)
    return ReadSettings(root, protocol, worker_uri(i.uri), dict(i.storage_options), tuple(i.extensions), i.image_column,
                        tuple(passthrough), i.max_bytes, i.images_per_shard, c.decode_batch_size,
                        c.retry_window_s, decode, chunk_bytes)


def use_gpu(job: Job) -> bool:
    """Whether the model actors ask for GPUs; decided once, when the cluster is first asked."""
    if job.gpu is None:
        job.gpu = _decide_gpu(job.cfg.compute.device)
    return job.gpu


def _decide_gpu(device: str) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    gpu = wants_gpu(device, gpus)
    if gpu and not gpus:
        log.warning("compute.device=cuda: no GPU in the cluster yet; the model actors wait for the autoscaler "
                    "to add GPU nodes")
    return gpu


def early_actors(cfg, embedder=None) -> tuple[bool, list]:
    """A first run's min_actors model actors, asked for as soon as Ray is up: their processes start and import
    torch while the driver loads the weights and lists the input (on a running cluster that was most of a small
    run's start); the pool takes them over with their settings and weights. Returns (GPUs asked for, handles)."""
    import ray

    from resnet_batch.embed.pool import actor_options, start_actor

    c = cfg.compute
    gpu = _decide_gpu(c.device)
    options = actor_options(c.cpus_per_actor, c.gpus_per_actor if gpu else 0, embedder)
    actors = [start_actor(options) for _ in range(c.min_actors)]
    # and a worker process for the first read, with the read path imported: Ray hands the first read task an
    # idle worker of this job, so the first block no longer waits for a process to start (it holds no CPU)
    ray.remote(num_cpus=0)(_warm_reader).remote()
    return gpu, actors


def _warm_reader() -> None:
    import resnet_batch.decode  # noqa: F401 (Pillow, numpy)
    import resnet_batch.embed.reader  # noqa: F401 (Ray Data, pyarrow, fsspec)
