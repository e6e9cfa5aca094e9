"""Are the tuning queries biased? recall@10 of an IVF index for database rows the lists were trained on, other
database rows, and new vectors, at each nprobe, and the nprobe the tuning picks from rows drawn regardless of
the training sample (as the build draws them) and from rows outside it.

    .venv/bin/python benchmarks/tuning_bias.py [--n 100000] [--rows 1000] [--held-out 2000] [--seed 0]

Draws n photo-like vectors (photo_like.py, bursts of ~11 as index_scaleout draws them) into float16 parts under
out/bench-tuning/<n> (kept for reruns), with the exact top-10 of held-out new vectors; builds the index with
`resnet-batch index`'s own build; then draws the training sample again (embeddings.sample_rows with the build's
seed and size) and measures, against exact search over the stored values:
- rows in the training sample, rows outside it, and rows drawn regardless (as the tuning draws them);
- the nprobe `tune_nprobe` picks from rows drawn regardless and from rows outside the sample, and the held-out
  recall@10 each nprobe gives new vectors (mean ± standard error).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from index_scale import write_parts  # noqa: E402
from index_scaleout import probes_around  # noqa: E402
from photo_like import PhotoLike, PhotoStats  # noqa: E402

from resnet_batch.search.embeddings import sample_rows  # noqa: E402
from resnet_batch.search.index import SimilarityIndex, normalize  # noqa: E402
from resnet_batch.search.tuning import ExactTopK, drop_self, lower_bound, recalls, tune_nprobe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
K = 10


def stored_vectors(emb: Path) -> np.ndarray:
    """Every part's embeddings in scan order (the build's ids are these row numbers), normalised."""
    import pyarrow.parquet as pq

    from resnet_batch.schema import embeddings_to_numpy

    parts = sorted(emb.glob("part-*.parquet"))
    return np.concatenate([normalize(embeddings_to_numpy(pq.read_table(p, columns=["embedding"])
                                                        .column("embedding").combine_chunks())) for p in parts])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=1000, help="database-row queries of each kind")
    ap.add_argument("--held-out", type=int, default=2000, help="new vectors, not in the database")
    ap.add_argument("--seed", type=int, default=0, help="the build's --seed: which rows it trains and tunes on")
    ap.add_argument("--work", default=str(REPO / "out" / "bench-tuning"))
    args = ap.parse_args()
    work = Path(args.work) / str(args.n)
    emb, truth_file, idx = work / "emb", work / "truth.npz", work / "index"
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; n={args.n}", flush=True)
    if not truth_file.exists():
        stats = PhotoStats.measure()
        gen = PhotoLike(stats, n_clusters=max(1, args.n // 11))
        held = gen.draw(args.held_out, np.random.default_rng(99)).astype(np.float16).astype(np.float32)
        _, ids = write_parts(emb, args.n, 10_000, held, stats, gen)
        np.savez(truth_file, queries=held, ids=ids)
    z = np.load(truth_file)
    held, held_truth = z["queries"], z["ids"]

    from resnet_batch.search.build import build_index

    shutil.rmtree(idx, ignore_errors=True)
    t0 = time.perf_counter()
    meta = build_index([str(emb)], str(idx), seed=args.seed, log=lambda m: None)
    print(f"built {meta['factory']} in {time.perf_counter() - t0:.1f} s; trained on {meta['train_size']} of "
          f"{meta['count']} rows ({meta['train_size'] / meta['count']:.0%}); tuned nprobe {meta['nprobe']} on "
          f"{meta['tuning']['queries']} rows", flush=True)

    x = stored_vectors(emb)
    n = len(x)
    train = sample_rows([n], meta["train_size"], meta["seed"])[0]  # as build._read_sample draws it
    rng = np.random.default_rng(3)
    kinds = {"in the training sample": rng.choice(train, args.rows, replace=False),
             "outside it": rng.choice(np.setdiff1d(np.arange(n), train), args.rows, replace=False),
             "drawn regardless": rng.choice(n, args.rows, replace=False)}
    exact = ExactTopK(x[np.concatenate(list(kinds.values()))], K + 1)
    for s in range(0, n, 50_000):
        exact.add(x[s:s + 50_000], np.arange(s, min(s + 50_000, n)))
    truth_ids = exact.result()[1]
    index = SimilarityIndex.open(str(idx))

    def per_query(rows: np.ndarray, truth: np.ndarray):
        def at(nprobe: int) -> np.ndarray:
            index.set_nprobe(nprobe)
            return recalls(drop_self(rows, index.search(x[rows], K + 1)[1], K), drop_self(rows, truth, K), K)
        return at

    curves, start = {}, 0
    for name, rows in kinds.items():
        curves[name] = per_query(rows, truth_ids[start:start + len(rows)])
        start += len(rows)

    def held_out(nprobe: int) -> np.ndarray:
        index.set_nprobe(nprobe)
        return recalls(list(index.search(held, K)[1]), list(held_truth), K)

    curves["new vectors (held out)"] = held_out
    nlist = meta["spec"]["nlist"]
    probes = probes_around(meta["nprobe"], nlist)
    print(f"\nrecall@{K} (mean over the queries) by nprobe, {args.rows} database rows of each kind, "
          f"{len(held)} new vectors")
    print(f"{'queries':<26}" + "".join(f"{p:>9}" for p in probes))
    for name, at in curves.items():
        print(f"{name:<26}" + "".join(f"{at(p).mean():>9.4f}" for p in probes), flush=True)

    print()
    for name in ("drawn regardless", "outside it"):
        t = tune_nprobe(curves[name], nlist, meta["tuning"]["target_recall"], K)
        r = held_out(t.nprobe)
        print(f"tuned on rows {name + ':':<18} nprobe {t.nprobe:>4} (recall {t.recall:.4f}, 95% lower bound "
              f"{t.lower:.4f}); new vectors at that nprobe: {r.mean():.4f} ± {r.std(ddof=1) / np.sqrt(len(r)):.4f} "
              f"(lower bound {lower_bound(r):.4f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
