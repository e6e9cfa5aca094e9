"""Exactly once through every kill: the driver dies (os._exit, or SIGKILL from one of its own tasks) at each
commit point of a sync and of a first run, on a local folder and on the S3 server the tests start; one rerun
then converges to exactly the current photos, each once, and the ledger agrees with the parts."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from resnet_batch.dev.sample_data import jpeg_bytes, make_sample_photos, source_photos, variant
from resnet_batch.embed.runner import run
from resnet_batch.output.ledger import read_ledger
from resnet_batch.output.state import load
from resnet_batch.output.status import output_status
from resnet_batch.output.store import OutputStore, part_record
from tests.helpers.jobs import REPO, job_config
from tests.helpers.standin import StandInEmbedder

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PER_SHARD = 4
SYNC_POINTS = ["drop-rewrite", "drop-task", "ledger", "manifest", "state", "success"]
FIRST_POINTS = ["first-manifest", "first-record", "first-ledger", "success"]


def _photo(seed: int) -> bytes:
    photos = list(source_photos().values())
    return jpeg_bytes(variant(photos[seed % len(photos)], np.random.default_rng(seed)), 90)


def _killed_run(drivers, ray_local, point: str, input_uri: str, output_uri: str, checkpoint, options=None) -> str:
    """An embed run in a driver of its own (a process forked for it, see killpoints.Forks) that dies at
    `point`; returns its log."""
    spec = {"point": point, "input": input_uri, "output": output_uri, "checkpoint": str(checkpoint),
            "ray": ray_local.get_runtime_context().gcs_address, "per_shard": PER_SHARD,
            "storage_options": options or {}, "pythonpath": str(REPO)}
    returncode, log = drivers.run(spec)
    assert returncode in (137, -9), f"the driver was to die at {point} (rc {returncode}):\n{log}"
    return log


def _cfg(input_uri, output_uri, checkpoint, options=None):
    return job_config(input_uri, output_uri, checkpoint, input={"images_per_shard": PER_SHARD,
                                                                 "storage_options": options or {}},
                      output={"storage_options": options or {}})


def _check_converged(output_uri: str, expected: set[str], options=None) -> pa.Table:
    """Complete, every current photo exactly once, and every part's own record is the ledger's."""
    store = OutputStore(output_uri, dict(options or {}))
    names = store.names()
    assert "_SUCCESS" in names
    parts = store.parts(names)
    table = pa.concat_tables([pq.read_table(store.fs.open(store.path(n), "rb")) for n in sorted(parts)])
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "an image is in the output twice"
    assert set(ids) == expected
    ledger = read_ledger(store)
    logged = {r["part"]: r for r in ledger.to_pylist() if r["part"]}
    for name in parts:
        own = part_record(store.fs, store.path(name))
        rows = pq.read_metadata(store.fs.open(store.path(name), "rb")).num_rows
        assert own["rows"] == rows == logged[name]["rows"], (name, own, logged.get(name))
    assert not [n for n in store.list_dir("_sync") if n], "the sync plan was left behind"
    status = output_status(output_uri, options)
    assert status["status"] == "complete" and status["counts"]["ok"] == len(expected)
    assert all(r["status"] in ("complete", "interrupted") for r in status["runs"]), status["runs"]
    assert load(store).pending is None
    return table


# -- a sync on a local folder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_sync(tmp_path_factory, checkpoint, ray_local):
    """A library embedded once (24 photos, six parts), then changed: one photo gone from each part, one
    photo's content changed, eight added. Returns (library, base output, photos now, the changed photo)."""
    tmp = tmp_path_factory.mktemp("killsync")
    root = tmp / "library"
    make_sample_photos(root, 24, per_folder=8, seed=21)
    base = tmp / "base"
    assert run(_cfg(root, base, checkpoint), embedder=StandInEmbedder)["complete"]
    parts = sorted(base.glob("part-*.parquet"))
    assert len(parts) == 6
    for p in parts:  # one photo leaves every part
        (root / sorted(pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist())[0]).unlink()
    changed = sorted(root.rglob("*.jpg"))[0]
    changed.write_bytes(_photo(77))
    for i in range(8):
        (root / "added").mkdir(exist_ok=True)
        (root / "added" / f"new-{i}.jpg").write_bytes(_photo(300 + i))
    current = {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}
    assert len(current) == 26
    return root, base, current, changed.relative_to(root).as_posix()


@pytest.mark.parametrize("point", SYNC_POINTS)
def test_a_sync_killed_at_each_commit_point_converges_on_one_rerun(local_sync, tmp_path, checkpoint, ray_local,
                                                                    killed_drivers, point):
    root, base, current, changed = local_sync
    out = tmp_path / "out"
    shutil.copytree(base, out)
    _killed_run(killed_drivers, ray_local, point, str(root), str(out), checkpoint)
    assert not (out / "_SUCCESS").exists()
    assert output_status(str(out))["status"] == "incomplete"
    report = run(_cfg(root, out, checkpoint), embedder=StandInEmbedder)
    assert report["complete"], report["shards"]
    table = _check_converged(str(out), current)
    # the changed photo was embedded again (its old row left with the sync), not kept
    old = pa.concat_tables([pq.read_table(p) for p in sorted(base.glob("part-*.parquet"))])
    old_row = old.filter(pc.equal(old.column("image_id"), changed)).column("embedding").to_pylist()
    new_row = table.filter(pc.equal(table.column("image_id"), changed)).column("embedding").to_pylist()
    assert len(old_row) == len(new_row) == 1 and old_row != new_row


# -- a first run on a local folder ----------------------------------------------------------------


@pytest.mark.parametrize("point", FIRST_POINTS)
def test_a_first_run_killed_at_each_commit_point_converges_on_one_rerun(tmp_path, checkpoint, ray_local,
                                                                         killed_drivers, point):
    root = tmp_path / "library"
    paths = make_sample_photos(root, 16, per_folder=8, seed=22)
    out = tmp_path / "out"
    _killed_run(killed_drivers, ray_local, point, str(root), str(out), checkpoint)
    assert not (out / "_SUCCESS").exists()
    report = run(_cfg(root, out, checkpoint), embedder=StandInEmbedder)
    assert report["complete"], report["shards"]
    _check_converged(str(out), {p.relative_to(root).as_posix() for p in paths})


# -- the same on S3 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_sync(tmp_path_factory, s3_server, checkpoint, ray_local):
    """On S3: 24 photos embedded once; then a folder moved (its rows are copied, not embedded), one photo
    gone from each remaining part, four added."""
    tmp = tmp_path_factory.mktemp("killsync-s3")
    make_sample_photos(tmp / "library", 24, per_folder=8, seed=23)
    s3_server.make_bucket("kill-lib")
    s3_server.make_bucket("kill-out")
    s3_server.upload_dir(tmp / "library", "kill-lib/photos")
    opts = s3_server.storage_options()
    fs = s3_server.filesystem()
    assert run(_cfg("s3://kill-lib/photos", "s3://kill-out/base", checkpoint, opts),
               embedder=StandInEmbedder)["complete"]
    for key in sorted(fs.find("kill-lib/photos/shard-002")):  # a renamed folder
        fs.copy(key, key.replace("/shard-002/", "/moved/"))
        fs.rm(key)
    fs.invalidate_cache()
    for key in [p for p in fs.find("kill-out/base") if p.rsplit("/", 1)[-1].startswith("part-")]:
        ids = sorted(pq.read_table(fs.open(key, "rb"), columns=["image_id"]).column("image_id").to_pylist())
        if not ids[0].startswith("shard-002/"):
            fs.rm(f"kill-lib/photos/{ids[0]}")
    for i in range(4):
        fs.pipe_file(f"kill-lib/photos/added/new-{i}.jpg", _photo(400 + i))
    fs.invalidate_cache()
    current = {p.split("kill-lib/photos/", 1)[1] for p in fs.find("kill-lib/photos")}
    assert len(current) == 24 - 4 + 4 and sum(c.startswith("moved/") for c in current) == 8
    return opts, current


@pytest.mark.s3
@pytest.mark.parametrize("point", ["copy-task", *SYNC_POINTS])
def test_a_sync_on_s3_killed_at_each_commit_point_converges_on_one_rerun(s3_sync, s3_server, checkpoint,
                                                                          ray_local, killed_drivers, point):
    opts, current = s3_sync
    fs = s3_server.filesystem()
    out = f"kill-out/{point}"
    for key in fs.find("kill-out/base"):
        fs.copy(key, key.replace("kill-out/base/", f"{out}/", 1))
    fs.invalidate_cache()
    _killed_run(killed_drivers, ray_local, point, "s3://kill-lib/photos", f"s3://{out}", checkpoint, opts)
    report = run(_cfg("s3://kill-lib/photos", f"s3://{out}", checkpoint, opts), embedder=StandInEmbedder)
    assert report["complete"], report["shards"]
    table = _check_converged(f"s3://{out}", current, opts)
    # the moved photos came by copy (any run) and kept their embeddings
    moved = table.filter(pc.starts_with(table.column("image_id"), "moved/"))
    assert len(moved) == 8
    assert all(p.startswith("s3://kill-lib/photos/moved/") for p in moved.column("path").to_pylist())


@pytest.mark.s3
@pytest.mark.parametrize("point", FIRST_POINTS)
def test_a_first_run_on_s3_killed_at_each_commit_point_converges_on_one_rerun(s3_sync, s3_server, checkpoint,
                                                                               ray_local, killed_drivers, point):
    opts, current = s3_sync
    out = f"s3://kill-out/first-{point}"
    _killed_run(killed_drivers, ray_local, point, "s3://kill-lib/photos", out, checkpoint, opts)
    report = run(_cfg("s3://kill-lib/photos", out, checkpoint, opts), embedder=StandInEmbedder)
    assert report["complete"], report["shards"]
    _check_converged(out, current, opts)
