"""Re-ranking within 1 KiB a vector: recall@10 and bytes per vector of each candidate re-ranking code, on the
same photo-like vectors and the same candidates.

Draws n photo-like vectors (photo_like.py) and held-out queries, computes their exact top-10, builds the
inverted file the product picks (uncentred PCA to 256 dimensions, nlist ~ 4 sqrt(n), SQ8 codes), takes each
query's 4 x 10 best candidates by code once, and re-scores those same candidates with each candidate
re-ranking code (build._trained_refiner: offsets from the mean, optionally projected onto their top principal
directions, float16, 8/6/4-bit or PQ; or the transform code TC1024 of coders.py: rotated onto the principal
directions, the top 256 as float16, the next 512 in 4 bits and the next 1024 in 2 bits; --tc-plans tries other
tiers), printing recall@10, bytes a vector and the re-scoring time a query.
"re-read from the embed parts" re-scores with the float16 vectors the parts hold (no re-ranking file; a
query then reads its 40 candidates' rows from Parquet).

    .venv/bin/python benchmarks/refine_choice.py --n 200000
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from photo_like import PhotoLike, PhotoStats  # noqa: E402
from resnet_batch.search.build import _trained_refiner, fit_projection, project  # noqa: E402
from resnet_batch.search.coders import TransformCoder  # noqa: E402
from resnet_batch.search.index import Refiner, normalize, refined_search  # noqa: E402
from resnet_batch.search.spec import PCA_TRAIN_MAX  # noqa: E402
from resnet_batch.search.tuning import ExactTopK, recall_at_k  # noqa: E402

K, FACTOR = 10, 4
CANDIDATES = [(0, "FP16"), (0, "TC1024"), (512, "FP16"), (0, "SQ6"), (0, "SQ4"), (1024, "SQ8"), (1024, "FP16"),
              (0, "PQ1024"), (0, "PQ512")]


def main() -> int:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, default=0, help="lists scanned (default: nlist/16)")
    ap.add_argument("--codes", nargs="*", help="candidates as DIMS:CODE (0: all dimensions), e.g. 0:PQ1024 512:FP16")
    ap.add_argument("--tc-plans", nargs="*", default=[],
                    help="transform-code tiers to try besides TC1024's, each as COMPONENTS:BITS:OUTSIDE,... "
                         "e.g. 192:16:0,768:4:0.001,1024:2:0.03")
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; n={args.n}, {args.queries} held-out "
          f"queries, k={K}, {FACTOR * K} candidates re-scored", flush=True)
    stats = PhotoStats.measure()
    gen = PhotoLike(stats, n_clusters=max(1, args.n // 11))
    rng = np.random.default_rng(7)
    t0 = time.perf_counter()
    x = np.concatenate([normalize(gen.draw(min(50_000, args.n - s), rng).astype(np.float16).astype(np.float32))
                        .astype(np.float16) for s in range(0, args.n, 50_000)])  # as the parts hold them
    queries = normalize(gen.draw(args.queries, np.random.default_rng(99)).astype(np.float16).astype(np.float32))
    exact = ExactTopK(queries, K)
    for s in range(0, args.n, 50_000):
        exact.add(x[s:s + 50_000].astype(np.float32), np.arange(s, min(args.n, s + 50_000)))
    truth = list(exact.result()[1])
    print(f"drew the vectors and their exact top-{K} in {time.perf_counter() - t0:.0f} s", flush=True)

    nlist = 2 ** round(math.log2(4 * math.sqrt(args.n)))
    sample = x[np.random.default_rng(0).choice(args.n, size=min(args.n, 40 * nlist), replace=False)]
    transform, _ = fit_projection(sample[:32768], 256)
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(256), 256, nlist, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    ivf.train(project(transform, sample))
    for s in range(0, args.n, 50_000):
        ivf.add(project(transform, x[s:s + 50_000].astype(np.float32)))
    ivf.nprobe = args.nprobe or max(1, nlist // 16)
    qp = project(transform, queries)
    _, by_code = ivf.search(qp, K)
    _, cand = ivf.search(qp, FACTOR * K)
    in_lists = recall_at_k([np.intersect1d(c, t) for c, t in zip(cand, truth)], truth, K)

    class Fixed:  # the same candidates for every re-ranking code
        def search(self, q, k):
            return None, cand

    print(f"IVF{nlist},SQ8 after PCA256, nprobe {ivf.nprobe}: recall@{K} by code alone {recall_at_k(list(by_code), truth, K):.4f}; "
          f"{in_lists:.4f} of the true top-{K} are among the {FACTOR * K} candidates (the ceiling of any re-ranking)\n")
    print(f"{'re-ranking code':<40} {'bytes/vector':>12} {'recall@10':>9} {'ms/query':>9}")
    print(f"{'none (codes only)':<40} {0:>12} {recall_at_k(list(by_code), truth, K):>9.4f} {'':>9}")
    t0 = time.perf_counter()
    exact_rr = []
    for q, c in zip(queries, cand):
        sc = x[c].astype(np.float32) @ q
        exact_rr.append(c[np.argsort(-sc, kind="stable")[:K]])
    print(f"{'re-read from the embed parts':<40} {'0 (+parts)':>12} {recall_at_k(exact_rr, truth, K):>9.4f} "
          f"{(time.perf_counter() - t0) * 1000 / len(queries):>9.3f}", flush=True)
    chosen = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.codes] if args.codes is not None else CANDIDATES
    plans = [tuple((int(w), int(b), float(o)) for w, b, o in (t.split(":") for t in p.split(","))) for p in args.tc_plans]
    for dims, code in chosen + [(0, plan) for plan in plans]:
        if isinstance(code, tuple):
            refiner = TransformCoder.trained(sample[:PCA_TRAIN_MAX], code)
            code = "TC " + "+".join(f"{w}x{b}b" for w, b, _ in code)
        else:
            refiner = _trained_refiner(sample, dims, code)
        codes = np.concatenate([refiner.sa_encode(x[s:s + 50_000].astype(np.float32))
                                for s in range(0, args.n, 50_000)])
        r = Refiner(refiner)
        t0 = time.perf_counter()
        _, found = refined_search(Fixed(), r, codes, lambda ids: ids, queries, K, FACTOR)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        name = ("transform code (TC1024)" if code == "TC1024" else code if code.startswith("TC ") else
                ("full 2048-d" if not dims else f"PCA{dims} of offsets") + f", {code}")
        print(f"{name:<40} {r.row_bytes:>12} {recall_at_k(list(found), truth, K):>9.4f} {ms:>9.3f}", flush=True)
        del codes
    return 0


if __name__ == "__main__":
    sys.exit(main())
