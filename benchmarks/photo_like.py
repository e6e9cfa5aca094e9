"""Vectors drawn like real embeddings of photos: matched to the mean, spectrum, norms and cluster structure of
the product's own embeddings of sample photographs (not isotropic noise).

`PhotoStats.measure()` runs the real embed job (configs/local.yaml, fp32) over the 242-image set of
neighbors_quality.py (22 photographs x 11 crops / flips / re-encodes) and keeps, from the L2-normalised
embeddings: the mean direction, the eigenvectors and eigenvalues of the covariance around it, the share of that
variance that lies within one photograph's images, and the log-normal fit of the raw norms. The covariance's
tail beyond the 241 measurable components is a power law fitted to components 10..200, spread isotropically.

`PhotoLike(stats, n_clusters).draw(m, rng)` draws raw embeddings: a cluster (a "photograph") uniformly, its
centre (fixed per cluster) plus within-cluster variation along the measured eigenvectors, the tail noise, the
mean, and a norm from the fitted distribution.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "out" / "bench-cache" / "photo_stats.npz"


@dataclass
class PhotoStats:
    mean: np.ndarray  # (d,) mean of the normalised embeddings
    vectors: np.ndarray  # (r, d) eigenvectors of the covariance around the mean, largest first
    values: np.ndarray  # (r,) their eigenvalues
    within: float  # share of the variance within one photograph's images
    tail_var: float  # per-dimension variance of the isotropic tail
    log_norm: tuple  # (mean, std) of log(norm) of the raw embeddings
    provenance: dict

    @classmethod
    def measure(cls, cache: Path = CACHE) -> "PhotoStats":
        if cache.exists():
            z = np.load(cache, allow_pickle=False)
            import json

            return cls(z["mean"], z["vectors"], z["values"], float(z["within"]), float(z["tail_var"]),
                       tuple(z["log_norm"]), json.loads(str(z["provenance"])))
        import json

        import pyarrow.parquet as pq

        from neighbors_quality import make_set
        from resnet_batch.config import load_config
        from resnet_batch.embed.runner import run
        from resnet_batch.schema import embeddings_to_numpy, read_provenance

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="photo-stats-") as tmp:
            data, out = Path(tmp) / "photos", Path(tmp) / "emb"
            data.mkdir()
            source = make_set(data, 11, 0)
            cfg = load_config(REPO / "configs" / "local.yaml", [f"input.uri={data}", f"output.uri={out}",
                                                                 "model.precision=fp32"])
            report = run(cfg, fresh=True, progress=False)
            assert report["complete"], report
            files = sorted(out.glob("part-*.parquet"))
            table = pq.read_table(files, columns=["image_id", "embedding", "status"])
            provenance = read_provenance(pq.read_schema(files[0]))
        x = embeddings_to_numpy(table.column("embedding")).astype(np.float64)
        names = [i.rsplit("/", 1)[-1] for i in table.column("image_id").to_pylist()]
        norms = np.linalg.norm(x, axis=1)
        xn = x / norms[:, None]
        mean = xn.mean(axis=0)
        c = xn - mean
        _, s, vt = np.linalg.svd(c, full_matrices=False)
        values = s ** 2 / len(c)
        keep = values > values[0] * 1e-12
        values, vectors = values[keep], vt[keep]
        groups = np.array([source[n] for n in names])
        within = sum(((c[groups == g] - c[groups == g].mean(axis=0)) ** 2).sum() for g in set(groups)) / (c ** 2).sum()
        idx = np.arange(10, min(200, len(values)))
        slope, icept = np.polyfit(np.log(idx + 1), np.log(values[idx]), 1)
        tail = np.exp(icept) * np.arange(len(values) + 1, x.shape[1] + 1) ** slope
        stats = cls(mean, vectors.astype(np.float32), values, float(within), float(tail.sum() / x.shape[1]),
                    (float(np.log(norms).mean()), float(np.log(norms).std())), provenance)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, mean=stats.mean, vectors=stats.vectors, values=stats.values, within=stats.within,
                 tail_var=stats.tail_var, log_norm=np.array(stats.log_norm), provenance=json.dumps(provenance))
        print(f"measured {len(x)} photo embeddings in {time.perf_counter() - t0:.0f} s: mean cosine to the mean "
              f"{float((xn @ mean).mean() / np.linalg.norm(mean)):.4f}, {len(values)} components, "
              f"{within:.0%} of the variance within a photograph", flush=True)
        return stats


class PhotoLike:
    """Draws raw embeddings like `stats` describes, from `n_clusters` photographs of ~n/n_clusters images each."""

    def __init__(self, stats: PhotoStats, n_clusters: int, seed: int = 0):
        self.s = stats
        rng = np.random.default_rng(seed)
        between = np.sqrt(stats.values * (1 - stats.within)).astype(np.float32)
        self.centres = rng.standard_normal((n_clusters, len(stats.values)), dtype=np.float32) * between
        self.spread = np.sqrt(stats.values * stats.within).astype(np.float32)

    def draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        d = self.s.vectors.shape[1]
        coef = self.centres[rng.integers(0, len(self.centres), m)]
        coef += rng.standard_normal(coef.shape, dtype=np.float32) * self.spread
        x = coef @ self.s.vectors + self.s.mean.astype(np.float32)
        x += rng.standard_normal((m, d), dtype=np.float32) * np.float32(np.sqrt(self.s.tail_var))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        norms = np.exp(rng.normal(*self.s.log_norm, size=(m, 1))).astype(np.float32)
        return x * norms
