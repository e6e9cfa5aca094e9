"""Every command keeps its exit-code promise (0, 1 or 2, never a crash at exit), run many times while CPU
burners keep every core busy: the load that made `status` abort after printing its answer (SIGABRT, 134)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from resnet_batch.dev.sample_data import make_sample_photos
from resnet_batch.embed.runner import run
from tests.helpers.jobs import REPO, job_config
from tests.helpers.standin import StandInEmbedder

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BURN = "import time\nend = time.time() + 900\nwhile time.time() < end:\n    pass\n"


@pytest.fixture
def burners():
    """One busy process per core (and one more), stopped by pid at the end."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range((os.cpu_count() or 2) + 1)]
    yield
    for p in procs:
        p.kill()
        p.wait()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet_batch.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_every_command_exits_0_1_or_2_under_load(tmp_path, checkpoint, ray_local, burners):
    photos = tmp_path / "photos"
    make_sample_photos(photos, 12, per_folder=6, seed=31)
    out = tmp_path / "out"
    assert run(job_config(photos, out, checkpoint, input={"images_per_shard": 4}), embedder=StandInEmbedder)["complete"]
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "_lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "started": time.time(),
                                              "heartbeat": time.time() + 3600}))
    index = tmp_path / "index"
    assert _cli("index", "--embeddings", str(out), "--out", str(index)).returncode == 0
    commands = {  # each with the exit code it promises
        ("status", str(out)): 0,
        ("status", str(out), "--json"): 0,
        ("status", str(out), "--failed"): 0,
        ("status", str(tmp_path / "nothing")): 2,
        ("embed", "--quiet", "--input", str(photos), "--output", str(locked), "-o", f"model.weights={checkpoint}"): 2,
        ("index", "--embeddings", str(out), "--out", str(index)): 0,
        ("sample-data", "--out", str(tmp_path / "more"), "-n", "2"): 0,
        ("--version",): 0,
    }
    repeats = {("status", str(out)): 10, ("status", str(out), "--json"): 5, ("status", str(out), "--failed"): 5}
    seen: dict[tuple, list[int]] = {}
    for args, expected in commands.items():
        for _ in range(repeats.get(args, 2)):
            proc = _cli(*args)
            seen.setdefault(args, []).append(proc.returncode)
            assert proc.returncode == expected, (args, proc.returncode, proc.stderr[-2000:])
            assert "terminate called" not in proc.stderr
    print({" ".join(a[:2]): len(codes) for a, codes in seen.items()})
