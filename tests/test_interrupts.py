"""Ctrl-C is honoured whatever SIGINT disposition a command inherits: started in the background by a
non-interactive shell (SIGINT ignored, as under `make test &` or cron), `embed` still stops with 130."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from resnet_batch.dev.sample_data import make_sample_photos
from tests.helpers.jobs import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _ignoring_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_embed_started_with_sigint_ignored_stops_on_ctrl_c(tmp_path, checkpoint, ray_address):
    make_sample_photos(tmp_path / "photos", 40, per_folder=20, seed=41)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "resnet_batch.cli", "embed", "--input", str(tmp_path / "photos"), "--output",
           str(out), "-o", f"model.weights={checkpoint}", "-o", "model.precision=fp32",
           "-o", "input.images_per_shard=4", "-o", "compute.batch_size=4", "-o", "compute.torch_threads=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **ray_address},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_ignoring_sigint)
    try:
        deadline = time.time() + 300
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted" in log
    assert not (out / "_SUCCESS").exists()


def test_neighbors_started_with_sigint_ignored_stops_on_ctrl_c_mid_job(tmp_path, ray_address):
    """The neighbours job (a Ray job) interrupted once it has begun its parts: exit 130, and no output that
    claims to be finished."""
    from resnet_batch.cli import main
    from tests.helpers.search import clustered_vectors, write_part

    for p in range(8):
        write_part(tmp_path / "emb" / f"part-{p:06d}.parquet", [f"img-{p}-{i:03d}" for i in range(300)],
                   clustered_vectors(300, seed=p))
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0
    out = tmp_path / "nb"
    cmd = [sys.executable, "-m", "resnet_batch.cli", "neighbors", "--index", str(tmp_path / "idx"), "--out", str(out),
           "-k", "5"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **ray_address},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_ignoring_sigint)
    try:
        first = proc.stdout.readline()  # "neighbours: 8 parts against ... index ...": the job has begun
        os.killpg(proc.pid, signal.SIGINT)
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert first.startswith("neighbours: 8 parts against"), first + log
    assert proc.returncode == 130, first + log[-3000:]
    assert "8/8 parts" not in log and not (out / "_neighbors.json").exists() and not (out / "near_duplicates.parquet").exists()
