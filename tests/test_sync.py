"""Incremental nights: a rerun over a changed input is a sync. New and changed photos are embedded, deleted
ones leave the output, unchanged ones are not touched; moved objects on a store are copied, not recomputed;
a kill -9 in the middle, then a rerun, still ends with every current photo exactly once."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from resnet_batch.decode import PreprocessSpec, decode_image
from resnet_batch.network import ResNet50Embedder
from resnet_batch.embed.runner import run
from resnet_batch.dev.sample_data import make_sample_photos
from resnet_batch.output.status import output_status
from tests.helpers.jobs import REPO, job_config
from tests.helpers.library import current_photos, new_photo
from tests.helpers.processes import kill_driver

pytestmark = pytest.mark.ray
SPEC = PreprocessSpec.from_weights("IMAGENET1K_V2")


def _table(out: Path):
    return pads.dataset(str(out), format="parquet").to_table()


def _embedding(path: Path, checkpoint: Path) -> np.ndarray:
    pixels = decode_image(path.read_bytes(), SPEC, max_pixels=10**8, draft=True)[0]
    emb, _ = ResNet50Embedder(torch.load(checkpoint, weights_only=True), SPEC, precision="fp32").embed(pixels[None])
    return emb[0].numpy()


def test_rerun_embeds_only_what_changed(tmp_path, checkpoint, ray_local):
    root = tmp_path / "library"
    make_sample_photos(root, 24, per_folder=8, seed=2)
    out = tmp_path / "out"
    cfg = job_config(root, out, checkpoint)
    first = run(cfg)
    assert first["complete"] and first["counts"]["this_run"]["images"] == 24
    parts_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    # night 2: three new photos in an existing folder, two in a new one, one overwritten, one deleted
    for i in range(3):
        new_photo(root / "shard-001" / f"new-{i}.jpg", 100 + i)
    for i in range(2):
        new_photo(root / "shard-new" / f"fresh-{i}.jpg", 200 + i)
    changed = sorted((root / "shard-002").glob("*.jpg"))[0]
    new_photo(changed, 300)
    deleted = sorted((root / "shard-000").glob("*.jpg"))[0]
    deleted.unlink()
    second = run(cfg)
    assert second["complete"] and (out / "_SUCCESS").exists()
    assert second["counts"]["this_run"]["images"] == 6  # only the new and the changed went through the model
    assert {k: second["sync"][k] for k in ("new", "changed", "deleted", "reused")} == \
        {"new": 5, "changed": 1, "deleted": 1, "reused": 0}
    table = _table(out)
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == current_photos(root)
    rows = dict(zip(ids, table.column("embedding").to_pylist()))
    rel = changed.relative_to(root).as_posix()
    np.testing.assert_allclose(rows[rel], _embedding(changed, checkpoint), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rows["shard-new/fresh-1.jpg"], _embedding(root / "shard-new" / "fresh-1.jpg",
                                                                          checkpoint), rtol=1e-4, atol=1e-4)
    # shard-001's part was not rewritten: its new photos went into a new part
    assert (out / "part-000001.parquet").stat().st_mtime_ns == parts_before["part-000001.parquet"]
    assert second["counts"]["ok"] == 24 - 1 + 5 and second["counts"]["inputs"] == 28

    # nothing changed: nothing done, the folder stays complete
    third = run(cfg)
    assert third["complete"] and third["counts"]["this_run"]["images"] == 0 and third["sync"]["unchanged"] == 28
    status = output_status(str(out))
    assert status["status"] == "complete" and [r["embedded"] for r in status["runs"]] == [24, 6, 0]
    assert [r["removed"] for r in status["runs"]] == [0, 1, 0]


OPTIONS = {"input": {"images_per_shard": 4}, "compute": {"batch_size": 4}}


def _cli(root, out, checkpoint, ray_address):
    """The embed CLI as a driver of its own, joined to the session's Ray (as a driver on a cluster is)."""
    cmd = [sys.executable, "-m", "resnet_batch.cli", "embed", "--quiet", "--input", str(root), "--output", str(out),
           "-o", f"model.weights={checkpoint}", "-o", "model.precision=fp32", "-o", "input.images_per_shard=4",
           "-o", "compute.batch_size=4", "-o", "compute.decode_batch_size=4", "-o", "compute.torch_threads=1"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO), **ray_address}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_kill_during_a_sync_then_rerun_is_exactly_once(tmp_path, checkpoint, ray_address):
    """The first night in this process; the sync night's driver killed -9 once it began embedding; the rerun's
    driver converges (both drivers of their own, on the session's Ray)."""
    root = tmp_path / "library"
    make_sample_photos(root, 16, per_folder=8, seed=6)
    out = tmp_path / "out"
    assert run(job_config(root, out, checkpoint, **OPTIONS), progress=False)["complete"]
    before = {p.name for p in out.glob("part-*.parquet")}
    for i in range(16):
        new_photo(root / "shard-002" / f"n-{i:02d}.jpg", 400 + i)
    for p in sorted((root / "shard-000").glob("*.jpg"))[:2]:
        p.unlink()
    new_photo(sorted((root / "shard-001").glob("*.jpg"))[0], 500)
    proc = _cli(root, out, checkpoint, ray_address)
    deadline = time.time() + 240
    while not {p.name for p in out.glob("part-*.parquet")} - before:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    kill_driver(proc)
    assert not (out / "_SUCCESS").exists()
    status = output_status(str(out))
    assert status["status"] == "incomplete" and not status["last_run_finished"]
    proc = _cli(root, out, checkpoint, ray_address)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    ids = _table(out).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == current_photos(root)
    assert (out / "_SUCCESS").exists() and not list(out.glob("_sync/*"))


def test_a_committed_sync_is_rolled_forward(tmp_path, checkpoint, ray_local):
    """A run killed right after committing its sync plan (before applying it): the next run applies it first."""
    from resnet_batch.embed import sync as syncing
    from resnet_batch.output.ledger import read_ledger
    from resnet_batch.output.manifest import read_manifest
    from resnet_batch.embed.plan import complete_shards, diff, select
    from resnet_batch.embed.listing import list_entries
    from resnet_batch.output.state import load, save
    from resnet_batch.output.store import OutputStore

    root = tmp_path / "library"
    make_sample_photos(root, 8, per_folder=8, seed=7)
    out = tmp_path / "out"
    cfg = job_config(root, out, checkpoint)
    run(cfg)
    gone = sorted(root.rglob("*.jpg"))[0]
    gone.unlink()
    new_photo(root / "shard-000" / "zz-new.jpg", 600)
    store = OutputStore(str(out), {})
    state = load(store)
    done, _ = complete_shards(read_ledger(store))
    current, _ = select(cfg.input, state.format, list_entries(cfg.input).pages)
    plan = diff(cfg.input, state.format, state.root, current, read_manifest(store), done, state.next_shard)
    syncing.store_plan(store, 2, plan)
    state.pending, state.next_shard = {"run": 2}, plan.next_shard
    save(store, state)  # ... and the run dies here
    report = run(cfg)
    assert report["complete"] and report["counts"]["this_run"]["images"] == 1
    ids = _table(out).column("image_id").to_pylist()
    assert sorted(ids) == sorted(current_photos(root))
    assert load(store).pending is None


@pytest.mark.s3
def test_sync_on_s3_copies_moved_objects_instead_of_embedding_them(tmp_path, s3_server, checkpoint, ray_local):
    root = tmp_path / "library"
    make_sample_photos(root, 12, per_folder=6, seed=8)
    s3_server.make_bucket("sync-lib")
    s3_server.make_bucket("sync-out")
    s3_server.upload_dir(root, "sync-lib/photos")
    opts = s3_server.storage_options()
    cfg = job_config("s3://sync-lib/photos", "s3://sync-out/emb", checkpoint,
                     input={"storage_options": opts, "images_per_shard": 4}, output={"storage_options": opts})
    first = run(cfg)
    assert first["complete"] and first["counts"]["this_run"]["images"] == 12
    fs = s3_server.filesystem()
    moved = sorted(fs.find("sync-lib/photos/shard-001"))
    for key in moved:  # a renamed folder: copy, then delete the originals
        fs.copy(key, key.replace("/shard-001/", "/renamed/"))
        fs.rm(key)
    new_photo(tmp_path / "added.jpg", 700)
    fs.pipe_file("sync-lib/photos/shard-000/added.jpg", (tmp_path / "added.jpg").read_bytes())
    second = run(cfg)
    assert second["complete"]
    assert second["sync"]["reused"] == len(moved) == 6 and second["sync"]["deleted"] == 6
    assert second["counts"]["this_run"]["images"] == 1  # only the added photo went through the model
    fs.invalidate_cache()
    tables = [pq.read_table(fs.open(p, "rb")) for p in fs.find("sync-out/emb") if p.rsplit("/", 1)[-1].startswith("part-")]
    import pyarrow as pa

    table = pa.concat_tables(tables)
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 13
    assert not any(i.startswith("shard-001/") for i in ids) and sum(i.startswith("renamed/") for i in ids) == 6
    rows = dict(zip(ids, table.column("embedding").to_pylist()))
    paths = dict(zip(ids, table.column("path").to_pylist()))
    assert paths["renamed/" + moved[0].rsplit("/", 1)[-1]] == "s3://sync-lib/photos/renamed/" + moved[0].rsplit("/", 1)[-1]
    for key in moved:
        name = key.rsplit("/", 1)[-1]
        np.testing.assert_allclose(rows[f"renamed/{name}"], _embedding(root / "shard-001" / name, checkpoint),
                                   rtol=1e-4, atol=1e-4)
