"""tuning module: exact top-k over a stream of vector chunks, recall against it, and the nprobe that meets a target."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


def matmul_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T in float32 through torch's BLAS (several times numpy's here on the large products of a build)."""
    import torch

    return (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            @ torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).T).numpy()


class ExactTopK:
    """The exact top-k (inner product) of fixed queries over vectors that arrive in chunks, with their ids."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if not len(self.queries) or not len(vectors):
            return
        sims = matmul_t(self.queries, vectors)
        self.merge(sims, np.broadcast_to(np.asarray(ids, np.int64), sims.shape))

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold in candidates (scores and ids per query), e.g. another ExactTopK's result over other vectors."""
        if not len(self.queries) or not scores.shape[1]:
            return
        cand = np.concatenate([self.ids, ids], axis=1)
        scores = np.concatenate([self.scores, scores], axis=1)
        top = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k] if scores.shape[1] > self.k else \
            np.broadcast_to(np.arange(scores.shape[1]), (len(scores), scores.shape[1]))
        self.scores = np.take_along_axis(scores, top, axis=1)
        self.ids = np.take_along_axis(cand, top, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), best first."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return np.take_along_axis(self.scores, order, axis=1), np.take_along_axis(self.ids, order, axis=1)


def drop_self(query_ids: np.ndarray, ids: np.ndarray, k: int) -> list[np.ndarray]:
    """Per query, the first k ids that are not the query itself (nor empty slots, -1)."""
    keep = (ids != np.asarray(query_ids)[:, None]) & (ids >= 0)
    return [row[m][:k] for row, m in zip(ids, keep)]


def recalls(found: list[np.ndarray], truth: list[np.ndarray], k: int) -> np.ndarray:
    """Per query, the share of its true k nearest that were found (one with fewer true ones counts those)."""
    return np.array([len(np.intersect1d(f[:k], t[:k])) / max(1, min(k, len(t))) for f, t in zip(found, truth)])


def recall_at_k(found: list[np.ndarray], truth: list[np.ndarray], k: int) -> float:
    """Mean recall@k over the queries."""
    r = recalls(found, truth, k)
    return float(r.mean()) if len(r) else 1.0


def lower_bound(per_query: np.ndarray) -> float:
    """The one-sided 95% lower confidence bound of the mean recall (normal approximation)."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 1.0
    return float(per_query.mean() - 1.645 * per_query.std(ddof=1) / np.sqrt(len(per_query)))


@dataclass
class Tuning:
    """What the nprobe search measured: the choice, its recall, and the curve it walked."""

    nprobe: int
    recall: float  # mean recall@k on the tuning queries
    lower: float  # its 95% lower confidence bound: what must reach the target
    target: float
    k: int
    queries: int
    met: bool
    curve: list = field(default_factory=list)  # [[nprobe, recall, lower bound], ...] in the order tried

    def as_dict(self) -> dict:
        return {"nprobe": self.nprobe, f"recall_at_{self.k}": round(self.recall, 4),
                "recall_lower_95": round(self.lower, 4), "target_recall": self.target, "k": self.k,
                "queries": self.queries, "target_met": self.met,
                "curve": [[p, round(r, 4), round(lb, 4)] for p, r, lb in self.curve]}


def tune_nprobe(per_query_recall: Callable[[int], np.ndarray], nlist: int, target: float, k: int) -> Tuning:
    """The smallest nprobe whose recall meets `target` with 95% confidence: doubling from 1, then bisecting.

    A setting passes when the lower confidence bound of its mean recall reaches the target, so that queries the
    tuning did not see (new images, other database rows) meet it too. Recall grows with nprobe (more lists
    scanned only add candidates), which the bisection relies on. Where even nprobe = nlist (every code
    scanned) misses, that is returned with met=False.
    """
    curve: dict[int, tuple[float, float]] = {}
    queries = 0

    def passes(p: int) -> bool:
        nonlocal queries
        if p not in curve:
            r = per_query_recall(p)
            queries = len(r)
            curve[p] = (float(r.mean()), lower_bound(r))
        return curve[p][1] >= target

    lo, hi = 0, 1
    while not passes(hi) and hi < nlist:
        lo, hi = hi, min(2 * hi, nlist)
    met = passes(hi)
    while met and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return Tuning(hi, *curve[hi], target, k, queries, met, [[p, *v] for p, v in curve.items()])
