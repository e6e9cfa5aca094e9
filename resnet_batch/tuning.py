"""tuning module: exact top-k over a stream of vector chunks, recall against it, and the nprobe that meets a target."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


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
        sims = self.queries @ np.ascontiguousarray(vectors, dtype=np.float32).T
        scores = np.concatenate([self.scores, sims], axis=1)
        cand = np.concatenate([self.ids, np.broadcast_to(np.asarray(ids, np.int64), sims.shape)], axis=1)
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


def recall_at_k(found: list[np.ndarray], truth: list[np.ndarray], k: int) -> float:
    """Mean share of each query's true k nearest that were found (a query with fewer true ones counts those)."""
    hits = [len(np.intersect1d(f[:k], t[:k])) / max(1, min(k, len(t))) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


@dataclass
class Tuning:
    """What the nprobe search measured: the choice, its recall, and the curve it walked."""

    nprobe: int
    recall: float
    target: float
    k: int
    queries: int
    met: bool
    curve: list = field(default_factory=list)  # [[nprobe, recall], ...] in the order tried

    def as_dict(self) -> dict:
        return {"nprobe": self.nprobe, f"recall_at_{self.k}": round(self.recall, 4), "target_recall": self.target,
                "k": self.k, "queries": self.queries, "target_met": self.met,
                "curve": [[p, round(r, 4)] for p, r in self.curve]}


def tune_nprobe(recall_at: Callable[[int], float], nlist: int, target: float, k: int, queries: int) -> Tuning:
    """The smallest nprobe whose recall meets `target`: doubling from 1, then bisecting the last step.

    Recall grows with nprobe (more lists scanned can only add candidates), which is what the bisection relies on.
    Where even nprobe = nlist (exhaustive over the codes) misses the target, that is returned with met=False.
    """
    curve: dict[int, float] = {}

    def measure(p: int) -> float:
        if p not in curve:
            curve[p] = recall_at(p)
        return curve[p]

    lo, hi = 0, 1
    while measure(hi) < target and hi < nlist:
        lo, hi = hi, min(2 * hi, nlist)
    if curve[hi] < target:
        return Tuning(hi, curve[hi], target, k, queries, False, list(curve.items()))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid) >= target:
            hi = mid
        else:
            lo = mid
    return Tuning(hi, curve[hi], target, k, queries, True, list(curve.items()))
