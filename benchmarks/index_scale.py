"""Index at scale: exact vs approximate search over >= 100,000 synthetic 2048-d embeddings.

    .venv/bin/python benchmarks/index_scale.py [--n 100000] [--queries 1000] [--threads N] [--hnsw]

Prints, for the exact (flat) index and the index `resnet-batch index` picks for this count (IVF-PQ with an
8-bit re-ranking store up to 4M vectors): build time, serialised size, recall@10 against exact search, and
query latency (one query at a time, and batched). The exact index is checked against a brute-force numpy
computation first. The vectors are made like pooled CNN features: a clustered 32-d latent, a random linear
map to 2048-d, ReLU, and a little noise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_batch.index import IndexSpec, new_faiss_index, normalize  # noqa: E402

DIM = 2048


def synthetic(n: int, seed: int, clusters: int = 1000, latent: int = 32) -> np.ndarray:
    """n non-negative 2048-d vectors with low intrinsic dimension (drawn in chunks to bound memory)."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(0).standard_normal((latent, DIM)).astype(np.float32) / np.sqrt(latent)
    centres = np.random.default_rng(1).standard_normal((clusters, latent)).astype(np.float32)
    out = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, 20_000):
        m = min(20_000, n - s)
        z = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal((m, latent)).astype(np.float32)
        out[s:s + m] = np.maximum(z @ w, 0) + 0.05 * np.abs(rng.standard_normal((m, DIM)).astype(np.float32))
    return out


def numpy_topk(xn: np.ndarray, qn: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k (float32 matmul in chunks, exact sort of the candidates)."""
    scores = np.empty((len(qn), k), dtype=np.float32)
    ids = np.empty((len(qn), k), dtype=np.int64)
    for s in range(0, len(qn), 250):
        sims = qn[s:s + 250] @ xn.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        ids[s:s + 250] = np.take_along_axis(part, order, axis=1)
        scores[s:s + 250] = np.take_along_axis(sims, ids[s:s + 250], axis=1)
    return scores, ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def latency(index, qn: np.ndarray, k: int, singles: int = 200) -> tuple[float, float, float]:
    """(p50 ms, p95 ms) one query at a time, and ms per query in one batch."""
    times = []
    for q in qn[:singles]:
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    index.search(qn, k)
    batch = (time.perf_counter() - t0) * 1000 / len(qn)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95)), batch


def size_mb(index) -> float:
    import faiss

    return faiss.serialize_index(index).nbytes / 2**20


def timed_build(spec, train, vectors):
    """A FAISS index for `spec`, trained on `train` and filled with `vectors`, and the seconds it took."""
    t0 = time.perf_counter()
    index = new_faiss_index(spec, train)
    index.add(vectors)
    return index, time.perf_counter() - t0


def main() -> int:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--hnsw", action="store_true", help="also build the HNSW index (slow on small machines)")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    k = args.k
    print(f"faiss {faiss.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; {args.n} base vectors + {args.queries} held-out queries, {DIM}-d, k={k}")
    t0 = time.perf_counter()
    xn = normalize(synthetic(args.n, seed=2))
    qn = normalize(synthetic(args.queries, seed=3))
    print(f"generated in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    ref_scores, ref_ids = numpy_topk(xn, qn, k)
    numpy_s = time.perf_counter() - t0
    spec = IndexSpec.choose(args.n, "flat")
    flat, flat_build = timed_build(spec, None, xn)
    ex_scores, ex_ids = flat.search(qn, k)
    same = float(np.mean([set(a) == set(b) for a, b in zip(ex_ids, ref_ids)]))
    max_diff = float(np.abs(ex_scores - ref_scores).max())
    # Where the sets differ, it must be a tie: every id FAISS returns scores (exactly, in float64) at least
    # the numpy k-th best, within float32 rounding.
    true = np.einsum("qd,qkd->qk", qn.astype(np.float64), xn[ex_ids].astype(np.float64))
    valid = float(np.mean((true >= ref_scores[:, -1:] - 1e-5).all(axis=1)))
    print(f"exact check: flat index vs numpy brute force ({numpy_s:.1f} s): same top-{k} ids for {same:.2%} of "
          f"queries, a valid top-{k} (differences are ties within 1e-5) for {valid:.2%}, "
          f"max |score diff| {max_diff:.1e}")
    assert valid == 1.0 and max_diff < 1e-5, "the exact index disagrees with numpy"

    rows = [("exact " + spec.factory, flat_build, size_mb(flat), 1.0, *latency(flat, qn, k))]
    auto = IndexSpec.choose(args.n)
    rng = np.random.default_rng(0)
    train = xn[np.sort(rng.choice(args.n, size=auto.train_size, replace=False))] if auto.train_size else None
    t0 = time.perf_counter()
    approx = new_faiss_index(auto, train)
    train_s = time.perf_counter() - t0
    approx.add(xn)
    build = time.perf_counter() - t0
    print(f"auto index for n={args.n}: {auto.factory} ({auto.search}), trained on {auto.train_size} vectors "
          f"in {train_s:.1f} s, built in {build:.1f} s")
    _, a_ids = approx.search(qn, k)
    rows.append((f"auto {auto.factory} [{auto.search}]", build, size_mb(approx), recall(a_ids, ex_ids),
                 *latency(approx, qn, k)))
    ps = faiss.ParameterSpace()
    for nprobe in (8, 16, 64):
        setting = ",".join(p if not p.startswith("nprobe=") else f"nprobe={nprobe}" for p in auto.search.split(","))
        ps.set_index_parameters(approx, setting)
        _, ids = approx.search(qn, k)
        rows.append((f"  same, {setting}", float("nan"), float("nan"), recall(ids, ex_ids), *latency(approx, qn, k)))
    ps.set_index_parameters(approx, auto.search)
    if isinstance(approx, faiss.IndexRefine):  # what n > 4M gets: the PQ codes alone, no re-ranking store
        base = faiss.downcast_index(approx.base_index)
        _, ids = base.search(qn, k)
        rows.append((f"  PQ codes only (n > 4M), nprobe={faiss.extract_index_ivf(base).nprobe}", float("nan"),
                     size_mb(base), recall(ids, ex_ids), *latency(base, qn, k)))
    if args.hnsw:
        h = IndexSpec.choose(args.n, "hnsw")
        hnsw, hb = timed_build(h, None, xn)
        _, ids = hnsw.search(qn, k)
        rows.append((f"hnsw {h.factory} [{h.search}]", hb, size_mb(hnsw), recall(ids, ex_ids), *latency(hnsw, qn, k)))

    print(f"\n{'index':<58} {'build s':>8} {'size MiB':>9} {'recall@' + str(k):>9} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'batch ms/q':>10}")
    for name, b, size, r, p50, p95, batch in rows:
        b_, size_ = ("-" if np.isnan(v) else f"{v:.1f}" for v in (b, size))
        print(f"{name:<58} {b_:>8} {size_:>9} {r:9.3f} {p50:7.2f} {p95:7.2f} {batch:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
