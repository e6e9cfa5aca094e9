"""model module: the ResNet-50 actor: one forward pass (network.ResNet50Embedder) gives top-k labels and the
2048-d embedding of each image; the actor writes its parts."""
from __future__ import annotations

import logging
import os
import posixpath
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from resnet_batch.layouts import TORCHVISION, Layout
from resnet_batch.decode import PreprocessSpec, crops_of
from resnet_batch.schema import (CONTROL_END, CONTROL_FAILURE, DEVICE_NO_CUDA, EMBEDDING_DIM, PASSTHROUGH_PREFIX,
                                 STATUS_DECODE_ERROR, STATUS_OK, embedding_array)
from resnet_batch.output.store import PartSettings, encode_part, part_name, read_parquet, write_file

@dataclass(frozen=True)
class ActorSettings:
    """Everything a model actor needs but the weights, in one small frozen object (passed inline, so a
    restarted actor gets it again without anything in the object store)."""

    spec: PreprocessSpec
    categories: tuple[str, ...]
    topk: int
    precision: str
    channels_last: bool
    compile: bool
    use_gpu: bool
    require_cuda: bool
    threads: Optional[int]
    batch_size: int
    max_pixels: int
    draft: bool
    formats: tuple[str, ...]  # the Pillow formats input.extensions allows
    output: PartSettings
    layout: Layout = TORCHVISION  # the network the weights need (WeightsInfo.layout)
    # Python API only (benchmarks): a callable (state_dict, spec, device) -> object with .embed(pixels) and
    # .device, used instead of ResNet-50. Neither a config key nor a flag reaches it.
    embedder: Optional[Callable] = None


class EmbedActor:
    """A model actor: takes blocks of decoded chunks, runs ResNet-50 in sub-batches of batch_size, writes each
    chunk's part itself (atomically, under its deterministic name) and returns one small record per chunk.

    A call prepares its chunk on the host (crops, pinning), runs the model under a lock (only the forward
    pass holds it), then builds and writes its part; on a GPU several calls run at once (pool.py), so one
    prepares and another writes while the device computes, and uploads overlap compute on a copy stream.
    On CPUs one call runs at a time (the forward pass takes every core). The weights, and the settings unless
    the actor was built with them, arrive with `ready()`, which the driver calls when the actor starts and again
    whenever Ray has restarted it: so a run can start the actor's process (and its torch import) before its
    weights are loaded.
    """

    def __init__(self, settings: Optional[ActorSettings] = None):
        # torch is imported here, in the actor's process, not with this module: the driver asks for its actors
        # before it imports torch itself (runner.py)
        import torch  # noqa: F401 (imported for its side effect: the process pays for it now)

        self.settings: Optional[ActorSettings] = None
        self.embedder = None
        self._decoder = None  # gpu_decode: built on first use
        self.node = _node_name()
        self.pid = os.getpid()
        self.actor_id = _actor_id()
        self.lock = threading.Lock()  # the model runs one call at a time; preparation and writing overlap it
        self._stream = None  # see _copy_stream
        if settings is not None:
            self._configure(settings)

    def _configure(self, settings: ActorSettings) -> None:
        s = self.settings = settings
        self.device = _actor_device(s.use_gpu, s.require_cuda)
        self.device_name = "cuda" if self.device == "cuda" else (DEVICE_NO_CUDA if s.use_gpu else "cpu")
        self.categories = np.array(s.categories, dtype=object)
        self.fs, self.root = s.output.fs()

    def ready(self, weights, settings: Optional[ActorSettings] = None) -> dict:
        """Take the settings (once), build the model from the weights (the state dict, resolved by Ray from the
        driver's single copy in the object store), once; then say where this actor runs and on what."""
        with self.lock:
            if self.settings is None:
                if settings is None:
                    raise RuntimeError("a model actor was started without settings and given none")
                self._configure(settings)
            if self.embedder is None:
                from resnet_batch.network import ResNet50Embedder

                s = self.settings
                if s.embedder is not None:
                    self.embedder = s.embedder(weights, s.spec, self.device)
                else:
                    self.embedder = ResNet50Embedder(weights, s.spec, precision=s.precision,
                                                     channels_last=s.channels_last, compile=s.compile,
                                                     device=self.device, threads=s.threads, layout=s.layout)
                    if self.device == "cuda":
                        self.embedder.warmup(s.batch_size)  # cudnn autotuning now, while the reads fill the queue
        return {"node": self.node, "pid": self.pid, "device": self.device_name, "actor": self.actor_id}

    def process(self, block: pa.Table, span: Optional[tuple[int, int]] = None) -> list[dict]:
        """One record per (shard, chunk) in the block (rows [start, end) of it when Ray Data handed over a
        slice): a part written, or why the chunk failed."""
        if span is not None:
            block = block.slice(span[0], span[1] - span[0])
        keys = pa.table({"s": block.column("_shard"), "c": block.column("_chunk")})
        records = []
        for s, c in dict.fromkeys(zip(keys.column("s").to_pylist(), keys.column("c").to_pylist())):
            mask = pc.and_(pc.equal(block.column("_shard"), s), pc.equal(block.column("_chunk"), c))
            try:
                records.append(self._chunk(block.filter(mask), s, c))
            except Exception as err:  # the model or the write failed: the driver retries the shard
                records.append(self._failure(s, c, f"{type(err).__name__}: {err}"))
        return records

    def _failure(self, shard: int, chunk: int, reason: str) -> dict:
        return {"shard": shard, "chunk": chunk, "error": reason, "node": self.node, "pid": self.pid,
                "actor": self.actor_id}

    def _chunk(self, g: pa.Table, shard: int, chunk: int) -> dict:
        status = np.array(g.column("status").to_pylist(), dtype=object)
        if (status == CONTROL_FAILURE).any():
            return self._failure(shard, chunk, g.column("error")[int(np.argmax(status == CONTROL_FAILURE))].as_py())
        expected = g.column("_rows")[0].as_py()
        if len(g) != expected:
            return self._failure(shard, chunk, f"chunk arrived split ({len(g)} of {expected} rows in one block)")
        end = status == CONTROL_END
        at = int(np.argmax(end))
        chunks, groups, skipped = ((int(g.column(c)[at].as_py()) for c in ("_chunks", "_groups", "_skipped"))
                                   if end.any() else (-1, -1, 0))
        images = g.filter(pa.array(~end))
        record = {"part": "", "shard": shard, "chunk": chunk, "chunks": chunks, "groups": groups,
                  "rows": len(images), "ok": 0,
                  "failed": 0, "skipped": skipped, "decode_s": float(pc.sum(images.column("_decode_s")).as_py() or 0),
                  "model_s": 0.0, "write_s": 0.0, "bytes": 0, "node": self.node, "pid": self.pid,
                  "device": self.device_name, "actor": self.actor_id, "run": self.settings.output.run}
        if not len(images):  # an empty last chunk: nothing to write, but the shard's chunk count arrives
            record["written_at"] = time.time()
            return record
        table, record["model_s"] = self._rows(images)  # the forward pass alone, not the wait for the lock
        t1 = time.perf_counter()
        name = part_name(shard, chunk)
        out = self.settings.output
        if images.column("_merge")[0].as_py():
            table = self._merge(name, table)
        ok = int(pc.sum(pc.equal(table.column("status"), STATUS_OK)).as_py() or 0)
        record.update(part=name, rows=len(table), ok=ok, failed=len(table) - ok, written_at=time.time())
        data = encode_part(table, out.schema, record, out.compression, self.node, self.pid)
        write_file(self.fs, posixpath.join(self.root, name), data, out.retry_window_s)
        record.update(write_s=time.perf_counter() - t1, bytes=len(data))
        return record

    def _merge(self, name: str, new: pa.Table) -> pa.Table:
        """--retry-failed: the part's earlier rows with these images replaced (each image still once)."""
        schema = self.settings.output.schema
        old = read_parquet(self.fs, posixpath.join(self.root, name))
        keep = old.filter(pc.invert(pc.is_in(old.column("image_id"), new.column("image_id"))))
        return pa.concat_tables([keep.select(schema.names).cast(schema), new.select(schema.names).cast(schema)])

    def _rows(self, images: pa.Table) -> tuple[pa.Table, float]:
        """Output rows for a chunk's images: host-side preparation, the forward pass in sub-batches (the only
        part that holds the model lock, so other calls prepare and write while the device computes), then
        labels and embeddings as Arrow columns. Returns the table and the seconds of the forward pass."""
        prepared = self._prepare(images)
        with self.lock:
            t0 = time.perf_counter()
            emb, ids, probs = self._infer(prepared)
            device_s = time.perf_counter() - t0
        return self._assemble(images, prepared, emb, ids, probs), device_s

    def _prepare(self, images: pa.Table) -> dict:
        """Host-side work before the device: the rows' status, sizes and crops (a view of the block's
        buffer); for compute.gpu_decode the JPEG bytes are decoded on the device, so that step is inside."""
        status = np.array(images.column("status").to_pylist(), dtype=object)
        error = np.array(images.column("error").to_pylist(), dtype=object)
        width, height = images.column("width").to_numpy().copy(), images.column("height").to_numpy().copy()
        ok = status == STATUS_OK
        pixels = crops_of(images.column("pixels"), ok, self.settings.spec.crop_size) \
            if "pixels" in images.column_names else None
        if pixels is not None and self.device == "cuda" and len(pixels):
            import torch

            # page-locked here, outside the lock, so the device's uploads are asynchronous DMA
            pixels = torch.from_numpy(np.ascontiguousarray(pixels)).pin_memory()
        return {"images": images, "status": status, "error": error, "width": width, "height": height, "ok": ok,
                "pixels": pixels}

    def _infer(self, p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The device part (called under the lock): embeddings, top-k ids and probabilities of the ok rows."""
        import torch

        s = self.settings
        if p["pixels"] is None:  # compute.gpu_decode: JPEG bytes, decoded on this actor's device
            p["pixels"], p["ok"] = self._decode_bytes(p["images"], p["status"], p["error"], p["ok"], p["width"],
                                                      p["height"])
        pixels, ok = p["pixels"], p["ok"]
        n_ok = int(ok.sum())
        emb = np.empty((n_ok, EMBEDDING_DIM), dtype=np.float32)
        ids = np.empty((n_ok, s.topk), dtype=np.int32)
        probs = np.empty((n_ok, s.topk), dtype=np.float32)
        batches = _uploads(pixels, s.batch_size, self._copy_stream())
        for start, batch in zip(range(0, n_ok, s.batch_size), batches):
            e, logits = self.embedder.embed(batch)
            top = torch.softmax(logits.float(), dim=1).topk(s.topk, dim=1)
            end = start + len(e)
            emb[start:end] = e.cpu().numpy()
            ids[start:end] = top.indices.cpu().numpy()
            probs[start:end] = top.values.cpu().numpy()
        return emb, ids, probs

    def _copy_stream(self):
        """On a GPU, the CUDA stream that uploads batches while the default stream computes (one per actor)."""
        if self.device != "cuda":
            return None
        if self._stream is None:
            import torch

            self._stream = torch.cuda.Stream()
        return self._stream

    def _assemble(self, images: pa.Table, p: dict, emb_ok, ids_ok, probs_ok) -> pa.Table:
        """The output table (outside the lock): results scattered to their rows, failed rows null."""
        s = self.settings
        ok, status, error, width, height = p["ok"], p["status"], p["error"], p["width"], p["height"]
        n = len(images)
        rows = np.flatnonzero(ok)
        emb = np.zeros((n, EMBEDDING_DIM), dtype=np.float32)
        ids = np.zeros((n, s.topk), dtype=np.int32)
        probs = np.zeros((n, s.topk), dtype=np.float32)
        emb[rows], ids[rows], probs[rows] = emb_ok, ids_ok, probs_ok
        k = s.topk
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
        mask = pa.array(~ok)
        columns = {
            "image_id": images.column("image_id"), "path": images.column("path"),
            "width": pa.array(width, pa.int32(), mask=width < 0),
            "height": pa.array(height, pa.int32(), mask=height < 0),
            "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel()), mask=mask),
            "topk_labels": pa.ListArray.from_arrays(offsets, pa.array(self.categories[ids.ravel()], pa.string()),
                                                    mask=mask),
            "topk_probs": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel()), mask=mask),
            "embedding": embedding_array(emb, ok, s.output.embedding_dtype),
            "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string()),
        }
        for name in images.column_names:  # pass-through columns, under their own names
            if name.startswith(PASSTHROUGH_PREFIX):
                columns[name[len(PASSTHROUGH_PREFIX):]] = images.column(name)
        return pa.table(columns)

    def _decode_bytes(self, images: pa.Table, status, error, ok, width, height):
        """The `ok` rows' bytes -> (crops on the device, new ok mask); failures become decode_error rows."""
        if self._decoder is None:
            from resnet_batch.embed.gpu_decode import DeviceJpegDecoder

            self._decoder = DeviceJpegDecoder(self.settings.spec, self.embedder.device,
                                              max_pixels=self.settings.max_pixels, draft=self.settings.draft,
                                              formats=self.settings.formats)
        out = self._decoder.decode(images.column("bytes").to_pylist(), images.column("_device_ok").to_pylist(),
                                   todo=ok)
        failed = ok & ~out.ok
        status[failed] = STATUS_DECODE_ERROR
        error[failed] = np.array(out.error, dtype=object)[failed]
        width[failed], height[failed] = -1, -1  # unknown for a failed image, as on the CPU path
        return out.pixels, out.ok


def _uploads(pixels, batch_size: int, stream) -> "Iterator":
    """The sub-batches of a chunk's crops as the model takes them. With a copy stream (a GPU and pinned host
    crops), every sub-batch's upload is queued on that stream at once, and each batch is handed over only
    after the compute stream waits for its copy: batch k+1 travels over PCIe while batch k computes."""
    import torch

    n = len(pixels)
    if stream is None or not isinstance(pixels, torch.Tensor) or pixels.device.type != "cpu":
        for start in range(0, n, batch_size):
            yield pixels[start:start + batch_size]
        return
    pending = []
    with torch.cuda.stream(stream):
        for start in range(0, n, batch_size):
            x = pixels[start:start + batch_size].to("cuda", non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
            pending.append((x, done))
    compute = torch.cuda.current_stream()
    for x, done in pending:
        compute.wait_event(done)
        x.record_stream(compute)  # the allocator must not reuse x's memory before compute is done with it
        yield x


def _actor_device(use_gpu: bool, require_cuda: bool) -> str:
    """"cuda" when Ray gave this actor a GPU and torch can use it; otherwise "cpu", or an error if required."""
    if not use_gpu:
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    message = (f"this model actor was given a GPU by Ray (CUDA_VISIBLE_DEVICES={visible}) on node {_node_name()}, "
               f"but torch {torch.__version__} sees no CUDA device (a CPU-only torch build, or no NVIDIA driver)")
    if require_cuda:
        raise RuntimeError(f"compute.device=cuda: {message}")
    logging.getLogger(__name__).warning("%s; running on the CPU", message)
    return "cpu"


def _node_name() -> str:
    """The Ray node id inside Ray; the host name outside it (never starts a Ray runtime)."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def _actor_id() -> str:
    """This actor's Ray id (stable across its restarts); the pid outside Ray."""
    import ray

    if ray.is_initialized():
        actor = ray.get_runtime_context().get_actor_id()
        if actor:
            return actor
    return f"pid-{os.getpid()}"
