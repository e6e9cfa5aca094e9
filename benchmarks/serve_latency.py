"""Query service latency: p50/p99 at concurrency 1 and 8 over 100k photo-like vectors, through real HTTP.

    .venv/bin/python benchmarks/serve_latency.py [--n 100000] [--requests 400]

Draws n embeddings like the product's own (photo_like.py) into float16 parts, builds the index the product picks
for them (`build_index`, as `resnet-batch index` does), starts `resnet-batch serve` in a subprocess on a free
loopback port, and times requests from an aiohttp client: neighbours of an indexed id (GET), of a vector (POST
JSON), and of an uploaded JPEG (embedded by the model the index records; concurrency 1 only, the model runs one
image at a time). Each figure is over --requests requests after 20 warm-up requests; the loops are bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from index_scale import write_parts  # noqa: E402
from photo_like import PhotoLike, PhotoStats  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


async def timed(session, make, count: int, concurrency: int) -> tuple[np.ndarray, float]:
    """Per-request milliseconds (count requests, `concurrency` at a time) and the wall seconds."""
    times: list[float] = []
    queue = iter(range(count))

    async def worker():
        for i in queue:
            method, url, kwargs = make(i)
            t0 = time.perf_counter()
            async with session.request(method, url, **kwargs) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}")
            times.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return np.array(times), time.perf_counter() - t0


async def run(base: str, ids: list[str], vectors: np.ndarray, jpegs: list[bytes], requests: int) -> list[tuple]:
    import aiohttp

    rows = []
    kinds = {
        "id (GET)": lambda i: ("GET", f"{base}/v1/neighbors", {"params": {"id": ids[i % len(ids)], "k": "10"}}),
        "vector (POST JSON)": lambda i: ("POST", f"{base}/v1/neighbors/vector",
                                         {"json": {"vector": vectors[i % len(vectors)].tolist(), "k": 10}}),
        "upload (POST JPEG)": lambda i: ("POST", f"{base}/v1/neighbors/image?k=10",
                                         {"data": jpegs[i % len(jpegs)], "headers": {"Content-Type": "image/jpeg"}}),
    }
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
        for name, make in kinds.items():
            for concurrency in ((1,) if name.startswith("upload") else (1, 8)):
                n = requests if not name.startswith("upload") else max(20, requests // 10)
                await timed(session, make, 20, concurrency)  # warm-up
                times, wall = await timed(session, make, n, concurrency)
                rows.append((name, concurrency, n, np.percentile(times, 50), np.percentile(times, 99), n / wall))
    return rows


def main() -> int:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--work", default=str(REPO / "out" / "bench-serve"))
    args = ap.parse_args()
    work = Path(args.work) / str(args.n)
    print(f"faiss {faiss.__version__}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; n={args.n}",
          flush=True)
    stats = PhotoStats.measure()
    gen = PhotoLike(stats, n_clusters=max(1, args.n // 11))
    emb, idx = work / "emb", work / "index"
    if not (idx / "index.json").exists():
        write_parts(emb, args.n, 10_000, np.zeros((0, stats.vectors.shape[1]), np.float32), stats, gen)
        from resnet_batch.search.build import build_index

        build_index([str(emb)], str(idx))
    import json

    meta = json.loads((idx / "index.json").read_text())
    print(f"index: {meta['factory']}, nprobe={meta['nprobe']} (recall@10 {meta['tuning'].get('recall_at_10')}), "
          f"{meta['count']} vectors", flush=True)
    import pyarrow as pa

    ids = pa.ipc.open_file(pa.memory_map(str(idx / "ids.arrow"))).read_all().column("image_id").to_pylist()
    ids = [ids[i] for i in np.random.default_rng(1).choice(len(ids), 1000, replace=False)]
    vectors = gen.draw(200, np.random.default_rng(2))
    jpegs = sample_jpegs(work / "photos")

    proc = subprocess.Popen([sys.executable, "-m", "resnet_batch.cli", "serve", "--index", str(idx), "--port", "0",
                             "--threads", str(os.cpu_count())], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        if " on http://" not in line:
            raise RuntimeError(f"the service did not start: {line!r}")
        print(line.strip(), flush=True)
        rows = asyncio.run(run(line.split(" on ", 1)[1].strip(), ids, vectors, jpegs, args.requests))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n{'query':<20} {'concurrency':>11} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    for name, c, n, p50, p99, rps in rows:
        print(f"{name:<20} {c:>11} {n:>8} {p50:8.2f} {p99:8.2f} {rps:7.1f}")
    return 0


def sample_jpegs(folder: Path) -> list[bytes]:
    from resnet_batch.dev.sample_data import make_sample_photos

    if not folder.exists():
        make_sample_photos(folder, 10, per_folder=10, seed=3)
    return [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))]


if __name__ == "__main__":
    sys.exit(main())
