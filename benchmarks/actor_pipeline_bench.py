"""actor_pipeline_bench: one model actor against a device-like stand-in; its throughput against the ceiling.

The stand-in (tests/helpers/standin.py DeviceStandIn, reachable only through the Python API) takes a fixed time
per batch with the GIL released and runs one batch at a time, as a GPU does: its ceiling is
batch_size / batch_s images/s. One real EmbedActor (started by the real ModelPool, so the pool's own
concurrency applies) gets pre-decoded blocks of real photos (made once by the real reader) as fast as the
pool takes them, prepares them, runs the stand-in, builds and writes each part. Printed: images/s, as a
share of the ceiling, and the host work per chunk outside the device; then the same with one call at a
time (how the actor ran before its pipeline) for comparison.

    python benchmarks/actor_pipeline_bench.py [--batch 64] [--batch-s 0.04] [--chunks 60]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def blocks(n_images: int, work: Path):
    """One decoded chunk of n_images real photos, as a read task hands it to an actor."""
    import functools

    from resnet_batch.decode import PreprocessSpec, decode_table, pillow_formats
    from resnet_batch.dev.sample_data import make_sample_photos
    from resnet_batch.config import DEFAULT_EXTENSIONS
    from resnet_batch.embed.listing import Shard
    from resnet_batch.embed.reader import ReadSettings, read_shard

    root = work / "photos"
    make_sample_photos(root, n_images, per_folder=n_images, seed=3)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    spec = PreprocessSpec.from_weights("IMAGENET1K_V2")
    decode = functools.partial(decode_table, spec=spec, max_pixels=10**8, draft=True,
                               formats=pillow_formats(DEFAULT_EXTENSIONS))
    read = ReadSettings(str(root), "file", str(root), {}, DEFAULT_EXTENSIONS, "jpg", (), 1 << 26, n_images, 16, 5.0,
                        decode)
    (chunk,) = list(read_shard(Shard(0, "files", tuple(paths), tuple(-1 for _ in paths)), read))
    return chunk, spec


def measure(chunk, spec, out: Path, batch: int, batch_s: float, chunks: int, device_like: bool) -> dict:
    import pyarrow as pa
    import ray

    from resnet_batch.embed.model import ActorSettings
    from resnet_batch.embed.pool import ModelPool
    from resnet_batch.output.store import PartSettings
    from resnet_batch.schema import output_schema
    from resnet_batch.weights import categories
    from tests.helpers.standin import DeviceStandIn

    part = PartSettings(str(out), {}, output_schema((), "float32"), "zstd", "float32", 5.0, 1)
    settings = ActorSettings(spec=spec, categories=categories("IMAGENET1K_V2"), topk=5, precision="fp32",
                             channels_last=False, compile=False, use_gpu=False, require_cuda=False, threads=1,
                             batch_size=batch, max_pixels=10**8, draft=True, formats=("JPEG",), output=part,
                             embedder=DeviceStandIn(batch_s, device_like=device_like))
    pool = ModelPool(settings, ray.put({}), min_actors=1, max_actors=1, num_cpus=1, num_gpus=0)
    for ref in pool.pending_refs():
        ray.wait([ref])
        pool.on_ready(ref)
    refs = []
    for i in range(chunks):  # every chunk its own shard (its own part)
        col = chunk.schema.get_field_index("_shard")
        refs.append(ray.put(chunk.set_column(col, "_shard", pa.array([i] * len(chunk), pa.int64()))))
    inflight: dict = {}
    sent = done = 0
    host, model = [], []
    t0 = None
    while done < chunks:
        while sent < chunks and (m := pool.free()) is not None:
            inflight[pool.submit(m, refs[sent], None)] = m
            sent += 1
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for r in ready:
            pool.done(inflight.pop(r))
            (rec,) = ray.get(r)
            assert "error" not in rec, rec
            done += 1
            if done == 3:  # the first chunks start the pipeline; time the steady state
                t0 = time.perf_counter()
                base = done
            model.append(rec["model_s"])
            host.append(rec["write_s"])
    seconds = time.perf_counter() - t0
    pool.shutdown()
    rate = (done - base) * len(chunk) / seconds
    ceiling = batch / batch_s
    return {"calls": pool.calls_per_actor - 1, "img_per_s": rate, "ceiling": ceiling, "share": rate / ceiling,
            "write_ms": 1000 * sum(host) / len(host), "model_ms": 1000 * sum(model) / len(model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="images per chunk and per device batch")
    ap.add_argument("--batch-s", type=float, default=0.04, help="the stand-in's seconds per batch")
    ap.add_argument("--chunks", type=int, default=60)
    a = ap.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="actor-bench-"))
    chunk, spec = blocks(a.batch, work)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    for device_like in (True, False):
        r = measure(chunk, spec, work / f"out-{device_like}", a.batch, a.batch_s, a.chunks, device_like)
        how = f"pipelined, {r['calls']} calls at once" if device_like else "one call at a time (before)"
        print(f"{how:36s}: {r['img_per_s']:7.0f} img/s = {r['share']:.2f} x the stand-in's ceiling "
              f"({r['ceiling']:.0f} img/s: {a.batch} images per {a.batch_s * 1000:.0f} ms); per chunk: device "
              f"{r['model_ms']:.0f} ms, part encode+write {r['write_ms']:.0f} ms", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
