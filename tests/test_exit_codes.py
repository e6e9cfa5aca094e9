"""Every command keeps its exit-code promise (0, 1 or 2, never a crash at exit), run many times under load: the
load that made `status` abort after printing its answer (SIGABRT, 134). The invocations run side by side, two
more than the cores, so that they keep every core busy and load each other (a burner beside them only burned
CPU the rest of the suite needs).
`serve` is started and stopped with SIGTERM and with SIGINT: stopping is how a service ends, so it exits 0."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from resnet_batch.dev.sample_data import make_sample_photos
from resnet_batch.embed.runner import run
from tests.helpers.jobs import REPO, job_config
from tests.helpers.standin import StandInEmbedder

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SIDE_BY_SIDE = (os.cpu_count() or 2) + 2  # invocations at once: more busy processes than cores


def _env(extra: dict) -> dict:
    return {**os.environ, **extra, "PYTHONPATH": str(REPO)}


def _cli(args: tuple, extra: dict) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "resnet_batch.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=_env(extra))
    return proc.returncode, proc.stderr


def _serve_stopped(index: str, sig: int) -> tuple[int, str]:
    """`serve` started, stopped with `sig` once it says it is serving; its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "resnet_batch.cli", "serve", "--index", index, "--port", "0",
                             "--no-upload", "--reload-s", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=_env({}))
    try:
        line = proc.stdout.readline()  # "serving IDX (N images, ...) on http://127.0.0.1:PORT"
        if line.startswith("serving "):
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, line + err


def test_every_command_exits_0_1_or_2_under_load(tmp_path, checkpoint, ray_address):
    photos = tmp_path / "photos"
    make_sample_photos(photos, 12, per_folder=6, seed=31)
    out = tmp_path / "out"
    assert run(job_config(photos, out, checkpoint, input={"images_per_shard": 4}), embedder=StandInEmbedder)["complete"]
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "_lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "started": time.time(),
                                              "heartbeat": time.time() + 3600}))
    index = tmp_path / "index"
    assert _cli(("index", "--embeddings", str(out), "--out", str(index)), {})[0] == 0
    some_id = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))[0]
    runs = []  # (what, how to run it, the exit code it promises)

    def cli(what: str, args: tuple, expected: int, times: int = 2, extra: dict = {}):
        for i in range(times):
            runs.append((what, lambda i=i: _cli(tuple(a.format(i=i) for a in args), extra), expected))

    for i in range(2):  # `index` over an index of its own: two at once on one folder would refuse one (2)
        shutil.copytree(index, tmp_path / f"index-{i}")
    cli("status", ("status", str(out)), 0, times=6)
    cli("status --json", ("status", str(out), "--json"), 0, times=3)
    cli("status --failed", ("status", str(out), "--failed"), 0, times=3)
    cli("status (no output)", ("status", str(tmp_path / "nothing")), 2)
    cli("embed", ("embed", "--quiet", "--input", str(photos), "--output", str(tmp_path / "emb-{i}"), "-o",
                  f"model.weights={checkpoint}", "-o", "input.images_per_shard=6", "-o", "compute.torch_threads=1"), 0,
        times=1, extra=ray_address)
    cli("weights (unknown name)", ("weights", "NOPE"), 2, times=1)
    cli("embed (locked)", ("embed", "--quiet", "--input", str(photos), "--output", str(locked), "-o",
                           f"model.weights={checkpoint}"), 2)
    cli("index", ("index", "--embeddings", str(out), "--out", str(tmp_path / "index-{i}")), 0)
    cli("sample-data", ("sample-data", "--out", str(tmp_path / "more-{i}"), "-n", "2"), 0)
    cli("--version", ("--version",), 0)
    cli("similar", ("similar", "--index", str(index), "--id", some_id, "-k", "3"), 0)
    cli("similar (unknown id)", ("similar", "--index", str(index), "--id", "nope.jpg"), 2, times=1)
    cli("gallery", ("gallery", "--index", str(index), "--out", str(tmp_path / "page-{i}.html"), "-n", "2", "-k", "2"),
        0)
    cli("neighbors", ("neighbors", "--quiet", "--index", str(index), "--out", str(tmp_path / "nb"), "-k", "3"), 0,
        times=1, extra=ray_address)
    for sig in (signal.SIGTERM, signal.SIGINT):
        runs.append((f"serve ({sig.name})", lambda sig=sig: _serve_stopped(str(index), sig), 0))
    runs.sort(key=lambda r: r[0] not in ("embed", "neighbors", "serve (SIGTERM)", "serve (SIGINT)"))  # the long ones first

    t0 = time.perf_counter()
    with ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
        done = list(zip(runs, pool.map(lambda r: r[1](), runs)))
    seen: dict[str, list[int]] = {}
    for (what, _, expected), (code, err) in done:
        seen.setdefault(what, []).append(code)
        assert code == expected, (what, code, err[-2000:])
        assert "terminate called" not in err and "Traceback" not in err, (what, err[-2000:])
    print(f"{len(done)} runs, {SIDE_BY_SIDE} at a time, in {time.perf_counter() - t0:.0f} s:",
          {what: len(codes) for what, codes in seen.items()})
