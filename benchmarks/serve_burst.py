"""Query service memory under a burst of concurrent large uploads: peak RSS against the stated bound.

    .venv/bin/python benchmarks/serve_burst.py [--clients 64] [--mb 15]

Builds a small index of photo-like vectors (no Ray), starts `resnet-batch serve` in a subprocess (defaults:
--max-uploads 8, --max-embed-queue 8, --max-upload-bytes 20M), makes one real JPEG of about --mb MiB, and sends it
from --clients concurrent clients at once. Samples the service's resident memory every 10 ms and prints: before,
peak (the kernel's VmHWM), the answers by status (200 served, 503 busy with Retry-After), and the bound the caps
give: (max uploads + max embed queue) x the upload's size over the idle service.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from index_scale import write_parts  # noqa: E402
from photo_like import PhotoLike, PhotoStats  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def big_jpeg(mb: float) -> bytes:
    """A real JPEG of about `mb` MiB (noise compresses badly), under the service's pixel cap."""
    from PIL import Image

    side = 1024
    while True:
        pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=100)
        if buf.tell() >= mb * 2**20:
            return buf.getvalue()
        side = int(side * 1.25)


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def burst(url: str, data: bytes, clients: int) -> collections.Counter:
    import aiohttp

    async def one(session):
        async with session.post(url, data=data, headers={"Content-Type": "image/jpeg"}) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After")

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        answers = await asyncio.gather(*(one(session) for _ in range(clients)), return_exceptions=True)
    return collections.Counter(a if isinstance(a, tuple) else type(a).__name__ for a in answers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--mb", type=float, default=15.0)
    ap.add_argument("--work", default=str(REPO / "out" / "bench-serve-burst"))
    args = ap.parse_args()
    work = Path(args.work)
    emb, idx = work / "emb", work / "index"
    if not (idx / "index.json").exists():
        stats = PhotoStats.measure()
        write_parts(emb, 2000, 1000, np.zeros((0, stats.vectors.shape[1]), np.float32), stats,
                    PhotoLike(stats, n_clusters=200))
        from resnet_batch.search.build import build_index

        build_index([str(emb)], str(idx))
    data = big_jpeg(args.mb)
    proc = subprocess.Popen([sys.executable, "-m", "resnet_batch.cli", "serve", "--index", str(idx), "--port", "0",
                             "--max-upload-bytes", "20M"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        if " on http://" not in line:
            raise RuntimeError(f"the service did not start: {line!r}")
        base = line.split(" on ", 1)[1].strip()
        url = f"{base}/v1/neighbors/image?k=10"
        asyncio.run(burst(url, data, 1))  # warm: the model has embedded once
        idle = rss(proc.pid)
        peak = [idle]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.01):
                peak[0] = max(peak[0], rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        answers = asyncio.run(burst(url, data, args.clients))
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        hwm = rss(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bound = (8 + 8) * len(data)
    print(f"{args.clients} concurrent uploads of {len(data) / 2**20:.1f} MiB in {wall:.1f} s; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"answers: {dict(answers)}")
    print(f"service RSS: idle {idle / 2**20:.0f} MiB, peak sampled {peak[0] / 2**20:.0f} MiB, VmHWM {hwm / 2**20:.0f} "
          f"MiB; growth {(max(peak[0], hwm) - idle) / 2**20:.0f} MiB against the caps' bound of {bound / 2**20:.0f} MiB "
          f"(8 received + 8 queued uploads of this size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
