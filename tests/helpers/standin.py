"""Stand-in models for tests and benchmarks (handed to runner.run(embedder=...) through the Python API only;
no config key or flag reaches them): deterministic embeddings at no compute cost, and one that raises on a
poison image, so the pipeline's own costs and fault handling can be measured and tested."""
from __future__ import annotations

import numpy as np
import torch


class StandInEmbedder:
    """Embeddings derived from the pixels (so different images differ) in microseconds."""

    def __init__(self, state_dict, spec, device):
        self.device = torch.device("cpu")

    def embed(self, pixels):
        x = torch.from_numpy(np.ascontiguousarray(pixels)).float()
        mean = x.mean(dim=(1, 2))  # (n, 3)
        emb = torch.cat([mean, x[:, ::32, ::32, :].reshape(len(x), -1)], dim=1)
        emb = torch.nn.functional.pad(emb, (0, 2048 - emb.shape[1]))[:, :2048]
        logits = torch.zeros(len(x), 1000)
        logits[:, :3] = mean
        return emb, logits


class PoisonEmbedder(StandInEmbedder):
    """Raises for every batch that holds an all-black image (the test's poison photo)."""

    def embed(self, pixels):
        flat = np.asarray(pixels).reshape(len(pixels), -1)
        if (flat.max(axis=1) == 0).any():
            raise RuntimeError("poison: an all-black image makes this model raise")
        return super().embed(pixels)


class _TimedDevice:
    """One device: a batch takes `batch_s` (a sleep, so the GIL is free as during a CUDA kernel), one batch
    at a time whoever calls (its own lock, like a device's queue)."""

    def __init__(self, batch_s: float):
        import threading

        self.batch_s, self.busy = batch_s, threading.Lock()
        self.device = torch.device("cpu")

    def embed(self, pixels):
        import time

        x = np.asarray(pixels)
        with self.busy:
            time.sleep(self.batch_s)
        emb = torch.zeros(len(x), 2048)
        emb[:, 0] = torch.from_numpy(x[:, 0, 0, 0].astype(np.float32))  # tells images apart, at no cost
        logits = torch.zeros(len(x), 1000)
        logits[:, 0] = 1.0
        return emb, logits


class DeviceStandIn:
    """A device-like stand-in model (benchmarks and tests only, through runner.run(embedder=...) or
    ActorSettings): a fixed time per batch with the GIL released. Its ceiling is batch_size / batch_s images/s.
    DEVICE_LIKE makes the pool pipeline its actors as it does GPU actors."""

    def __init__(self, batch_s: float, device_like: bool = True):
        self.batch_s = batch_s
        self.DEVICE_LIKE = device_like

    def __call__(self, state_dict, spec, device):
        return _TimedDevice(self.batch_s)
