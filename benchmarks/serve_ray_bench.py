"""`serve --ray` with 1 and 2 replicas against `serve` (one process) under the same fixed load of id queries:
requests a second, p50/p99 latency, start-up time and the RSS of the serving processes.

    .venv/bin/python benchmarks/serve_ray_bench.py --index out/bench-scaleout/100000/ray2
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

REPO = Path(__file__).resolve().parent.parent


async def load(base: str, ids: list[str], concurrency: int) -> tuple[float, float, float]:
    """Every id once, `concurrency` at a time: (requests a second, p50 ms, p99 ms)."""
    import aiohttp

    times, queue = [], list(ids)
    async with aiohttp.ClientSession() as session:
        async def worker():
            while queue:
                image_id = queue.pop()
                t0 = time.perf_counter()
                async with session.get(f"{base}/v1/neighbors", params={"id": image_id, "k": "10"}) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.array(times) * 1000
    return len(ids) / wall, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def rss_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def wait_up(base: str, timeout: float = 600) -> None:
    import urllib.request

    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{base} did not come up")


def main() -> int:
    import pyarrow as pa

    from resnet_batch.dev.localcluster import free_ports
    from resnet_batch.search.index import read_meta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    meta = read_meta(args.index)
    ids_file = Path(args.index) / meta.get("layout", {}).get("ids", "ids.arrow")
    all_ids = pa.ipc.open_file(pa.memory_map(str(ids_file))).read_all().column("image_id")
    rng = np.random.default_rng(0)
    ids = [all_ids[int(i)].as_py() for i in rng.choice(len(all_ids), args.requests + 20, replace=False)]
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {meta['count']} ids, {meta['factory']}; "
          f"{args.requests} id queries (k=10) at concurrency {args.concurrency}", flush=True)
    print(f"{'service':<22} {'start s':>8} {'RSS MiB (all its processes, Ray included)':>8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "PYTHONPATH": str(REPO)}
    for label, extra in (("serve (one process)", []), ("serve --ray, 1 replica", ["--ray", "--replicas", "1"]),
                         ("serve --ray, 2 replicas", ["--ray", "--replicas", "2"])):
        port = free_ports(1)[0]
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "resnet_batch.cli", "serve", "--index", args.index, "--port",
                                 str(port), "--no-upload", "--reload-s", "0", *extra], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_up(base)
            start = time.perf_counter() - t0
            asyncio.run(load(base, ids[:20], 4))  # warm-up
            qps, p50, p99 = asyncio.run(load(base, ids[20:], args.concurrency))
            # the serving processes: the service itself, or Ray's replica actors (and proxy, controller) in its session
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _session(int(p)) == proc.pid]
            print(f"{label:<22} {start:8.1f} {rss_of(pids) / 2**20:8.0f} {qps:7.1f} {p50:7.2f} {p99:7.2f}",
                  flush=True)
        finally:  # the service and every process it started (Ray's, in its session)
            import signal

            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
            for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and _session(int(p)) == proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    return 0


def _session(pid: int):
    try:
        return os.getsid(pid)
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
