"""Overnight-proof: kill -9 of the driver at several points, an actor dying mid-run; resume is exactly-once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from resnet_batch.dev.sample_data import make_sample_photos
from resnet_batch.embed.runner import run
from tests.helpers.jobs import job_config
from tests.helpers.processes import kill_driver

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_ray]
N_IMAGES, PER_SHARD = 40, 4


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    paths = make_sample_photos(root, N_IMAGES, per_folder=20, seed=5)
    return root, {p.relative_to(root).as_posix() for p in paths}


def _start(input_dir, out, checkpoint, env=None, extra=()):
    cmd = [sys.executable, "-m", "resnet_batch.cli", "embed", "--quiet", "--input", str(input_dir),
           "--output", str(out), "-o", f"model.weights={checkpoint}", "-o", "model.precision=fp32",
           "-o", f"input.images_per_shard={PER_SHARD}", "-o", "compute.batch_size=4",
           "-o", "compute.decode_batch_size=4", "-o", "compute.torch_threads=1", *extra]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _parts(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in out.glob("part-*.parquet")}


def _finish(input_dir, out, checkpoint) -> dict:
    """The resume, in this process on the session's Ray, with the killed run's settings: its report."""
    cfg = job_config(input_dir, out, checkpoint, input={"images_per_shard": PER_SHARD}, compute={"batch_size": 4})
    report = run(cfg, progress=False)
    assert report["complete"], report
    return report


def _assert_exactly_once(out, expected):
    ids = pads.dataset(str(out), format="parquet").to_table(columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert set(ids) == expected
    assert (out / "_SUCCESS").exists()
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize("kill_after_parts", [1, 6])
def test_kill_driver_then_resume(many_photos, checkpoint, tmp_path, kill_after_parts, ray_local):
    """The driver, with the Ray it started, killed -9 after `kill_after_parts` parts; the resume embeds only
    the shards without a part and rewrites none of those that survived."""
    input_dir, expected = many_photos
    out = tmp_path / "out"
    proc = _start(input_dir, out, checkpoint)
    deadline = time.time() + 240
    while len(_parts(out)) < kill_after_parts:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no output appeared"
        time.sleep(0.05)
    kill_driver(proc)
    survived = _parts(out)
    total = N_IMAGES // PER_SHARD
    assert kill_after_parts <= len(survived) < total
    assert not (out / "_SUCCESS").exists() and not (out / "_run_report.json").exists()
    report = _finish(input_dir, out, checkpoint)
    redone = N_IMAGES - PER_SHARD * len(survived)
    assert report["counts"]["this_run"] == {"images": redone, "ok": redone, "failed": 0}
    assert report["counts"]["done_before"] == N_IMAGES - redone
    after = _parts(out)
    assert {k: after[k] for k in survived} == survived  # finished shards were not rewritten
    _assert_exactly_once(out, expected)


def _actor_pids() -> list[int]:
    """Model actor processes of the session's Ray (this process started its raylet; Ray titles the actors
    ray::EmbedActor...), not those of another Ray on this machine."""
    def children(parent: int, pattern: str) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(parent), "-f", pattern], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    return [pid for raylet in children(os.getpid(), "raylet") for pid in children(raylet, "ray::EmbedActor")]


def test_actor_killed_mid_run_is_restarted(many_photos, checkpoint, tmp_path, ray_address):
    """kill -9 of the model actor's process from outside, after its first part: Ray restarts it, the driver
    gives it the weights again, and the shards it held go round again; every image exactly once."""
    input_dir, expected = many_photos
    out = tmp_path / "out"
    before = set(_actor_pids())
    proc = _start(input_dir, out, checkpoint, env=ray_address)  # a driver of its own on the session's Ray
    deadline = time.time() + 240
    while not _parts(out):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    victims = [p for p in _actor_pids() if p not in before]
    assert victims, "no model actor process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert f"images: {len(expected)} ok, 0 failed" in log
    _assert_exactly_once(tmp_path / "out", expected)


def test_the_temporary_files_of_a_write_cut_short_are_removed_by_the_next_run(tmp_path, checkpoint, ray_local):
    """A kill during an atomic write leaves its hidden temporary file (`.NAME.tmp-xxxxxxxx`); the next run (here
    a sync with nothing to do) removes those of ours, in the folder and its piece folders, and no other file."""
    from tests.helpers.standin import StandInEmbedder

    make_sample_photos(tmp_path / "lib", 4, per_folder=4, seed=43)
    out = tmp_path / "out"
    cfg = job_config(tmp_path / "lib", out, checkpoint)
    assert run(cfg, embedder=StandInEmbedder)["complete"]
    ours = [out / ".part-000001.parquet.tmp-0a1b2c3d", out / "_ledger" / ".l-0002-000000.parquet.tmp-0a1b2c3d"]
    theirs = [out / ".notes.txt.tmp-0a1b2c3d", out / "_ledger" / "notes.tmp-1"]
    for p in ours + theirs:
        p.write_bytes(b"half a write")
    assert run(cfg, embedder=StandInEmbedder)["complete"]
    assert [p.exists() for p in ours] == [False, False]
    assert [p.exists() for p in theirs] == [True, True]
    ids = pads.dataset(str(out), format="parquet").to_table(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(p.relative_to(tmp_path / "lib").as_posix() for p in (tmp_path / "lib").rglob("*.jpg"))
