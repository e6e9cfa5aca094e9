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
