"""Nights at scale, end to end with the real model and the real S3 server: an inventory instead of a listing
(first night and a sync night), a night with nothing to do answers without Ray, and a kill -9 during a
partitioned sync (the diff in Ray tasks over several partitions) converges in one rerun."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from resnet_batch.dev.sample_data import make_sample_photos
from resnet_batch.embed.runner import run
from tests.helpers.jobs import REPO, job_config
from tests.helpers.processes import kill_driver
from tests.helpers.library import current_photos, new_photo

pytestmark = pytest.mark.ray

# A driver that runs the CLI with a small partition size, so that a few dozen photos take the partitioned
# path (Ray tasks over several partitions) that a night over millions takes. Test-only: a module constant
# set in this driver process, no config key.
DRIVER = ("import sys; from resnet_batch.embed import syncdiff; syncdiff.ROWS_PER_PARTITION = 8; "
          "from resnet_batch.cli import main; sys.exit(main(sys.argv[1:]))")


def _cmd(root, out, checkpoint, *extra) -> list[str]:
    return [sys.executable, "-c", DRIVER, "embed", "--quiet", "--input", str(root), "--output", str(out),
            "-o", f"model.weights={checkpoint}", "-o", "model.precision=fp32", "-o", "input.images_per_shard=4",
            "-o", "compute.batch_size=4", "-o", "compute.decode_batch_size=4", "-o", "compute.torch_threads=1", *extra]


def _popen(cmd, env=None):
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _ids(out: Path) -> list[str]:
    return pads.dataset(str(out), format="parquet").to_table(columns=["image_id"]).column("image_id").to_pylist()


@pytest.mark.slow
def test_kill_during_a_partitioned_sync_then_one_rerun_is_exactly_once(tmp_path, checkpoint, ray_address):
    """The first night in this process; the partitioned sync night's driver killed -9 once it began embedding;
    the rerun's driver converges (both drivers of their own, on the session's Ray)."""
    root = tmp_path / "library"
    make_sample_photos(root, 24, per_folder=8, seed=16)
    out = tmp_path / "out"
    assert run(job_config(root, out, checkpoint, input={"images_per_shard": 4}, compute={"batch_size": 4}),
               progress=False)["complete"]
    before = {p.name for p in out.glob("part-*.parquet")}
    for i in range(12):
        new_photo(root / "shard-003" / f"n-{i:02d}.jpg", 800 + i)
    for p in sorted((root / "shard-000").glob("*.jpg"))[:3]:
        p.unlink()
    new_photo(sorted((root / "shard-001").glob("*.jpg"))[0], 900)
    proc = _popen(_cmd(root, out, checkpoint), ray_address)
    deadline = time.time() + 300
    while not {p.name for p in out.glob("part-*.parquet")} - before:  # the sync is applied, embedding began
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    kill_driver(proc)
    assert not (out / "_SUCCESS").exists()
    proc = _popen(_cmd(root, out, checkpoint), ray_address)
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log
    ids = _ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == current_photos(root)
    report = json.loads((out / "_run_report.json").read_text())
    assert report["complete"] and report["driver"]["peak_rss_bytes"] > 0
    assert not list(out.glob("_sync/*"))


def test_a_night_with_nothing_to_do_starts_no_ray(tmp_path, checkpoint, ray_local):
    root = tmp_path / "library"
    make_sample_photos(root, 8, per_folder=8, seed=17)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "resnet_batch.cli", *_cmd(root, out, checkpoint)[3:]]
    assert run(job_config(root, out, checkpoint, input={"images_per_shard": 4}, compute={"batch_size": 4}),
               progress=False)["complete"]  # the first night, in this process on the session's Ray
    t0 = time.perf_counter()
    again = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                           timeout=400)
    seconds = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "_run_report.json").read_text())
    assert report["complete"] and report["sync"]["unchanged"] == 8 and report["counts"]["this_run"]["images"] == 0
    assert "ray" not in report["startup"] and report["ray_logs"] is None  # Ray was never started
    assert report["driver"]["peak_rss_bytes"] > 0
    print(f"a night with nothing to do: {seconds:.1f} s for the whole command")


@pytest.mark.s3
def test_inventory_first_night_and_sync_night_on_s3(tmp_path, s3_server, checkpoint, ray_local):
    from resnet_batch.embed.runner import run

    root = tmp_path / "library"
    make_sample_photos(root, 12, per_folder=6, seed=18)
    s3_server.make_bucket("nights-lib")
    s3_server.make_bucket("nights-out")
    s3_server.upload_dir(root, "nights-lib/photos")
    fs = s3_server.filesystem()
    opts = s3_server.storage_options()

    def report_inventory(name: str) -> str:
        """An S3 Inventory report (Parquet + manifest.json) of the bucket as it is now."""
        fs.invalidate_cache()
        keys = sorted(k.split("/", 1)[1] for k in fs.find("nights-lib/photos"))
        infos = [fs.info(f"nights-lib/{k}") for k in keys]
        table = pa.table({"bucket": ["nights-lib"] * len(keys), "key": keys,
                          "size": pa.array([i["size"] for i in infos], pa.int64()),
                          "last_modified_date": pa.array([i["LastModified"] for i in infos], pa.timestamp("ms", "UTC")),
                          "e_tag": [i["ETag"].strip('"') for i in infos]})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        fs.pipe_file(f"nights-out/inventory/{name}/data/0.parquet", sink.getvalue().to_pybytes())
        fs.pipe_file(f"nights-out/inventory/{name}/manifest.json", json.dumps({
            "sourceBucket": "nights-lib", "destinationBucket": "arn:aws:s3:::nights-out", "fileFormat": "Parquet",
            "files": [{"key": f"inventory/{name}/data/0.parquet"}]}).encode())
        return f"s3://nights-out/inventory/{name}/manifest.json"

    cfg = job_config("s3://nights-lib/photos", "s3://nights-out/emb", checkpoint,
                     input={"storage_options": opts, "images_per_shard": 4, "inventory": report_inventory("d1")},
                     output={"storage_options": opts})
    first = run(cfg)
    assert first["complete"] and first["counts"]["this_run"]["images"] == 12
    # the next day: one photo added, one deleted, a folder moved; and a photo the inventory does not list yet
    # (added after the report was made) waits for the next night
    moved = sorted(fs.find("nights-lib/photos/shard-001"))
    for key in moved:
        fs.copy(key, key.replace("/shard-001/", "/renamed/"))
        fs.rm(key)
    fs.rm(sorted(fs.find("nights-lib/photos/shard-000"))[0])
    new_photo(tmp_path / "added.jpg", 950)
    fs.pipe_file("nights-lib/photos/shard-000/added.jpg", (tmp_path / "added.jpg").read_bytes())
    second_cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"inventory": report_inventory("d2")})})
    fs.pipe_file("nights-lib/photos/shard-000/late.jpg", (tmp_path / "added.jpg").read_bytes())
    second = run(second_cfg)
    assert second["complete"]
    assert second["sync"]["reused"] == len(moved) == 6 and second["sync"]["deleted"] == 7
    assert second["counts"]["this_run"]["images"] == 1  # only the added photo went through the model
    fs.invalidate_cache()
    ids = []
    for p in fs.find("nights-out/emb"):
        if p.rsplit("/", 1)[-1].startswith("part-"):
            ids += pq.read_table(fs.open(p, "rb"), columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert "shard-000/added.jpg" in ids and "shard-000/late.jpg" not in ids
    assert sum(i.startswith("renamed/") for i in ids) == 6 and not any(i.startswith("shard-001/") for i in ids)


@pytest.mark.s3
def test_first_night_on_s3_is_listed_by_ray_tasks(tmp_path, s3_server, checkpoint, ray_local, monkeypatch):
    """A first run over an S3 prefix larger than the driver lists alone (DRIVER_LISTING_KEYS, 0 here) lists it
    in Ray tasks (as a sync night does), their pages cut into shards as they arrive: the driver's own listing
    is never walked, and every photo is embedded once."""
    from resnet_batch.embed import listing
    from resnet_batch.embed.runner import run

    root = tmp_path / "library"
    make_sample_photos(root, 12, per_folder=3, seed=21)
    (root / "notes.txt").write_text("not a photo")
    s3_server.make_bucket("first-lib")
    s3_server.make_bucket("first-out")
    s3_server.upload_dir(root, "first-lib/photos")

    def driver_listing(*args):
        raise AssertionError("the driver walked the S3 listing itself")
        yield

    monkeypatch.setattr(listing, "_s3_pages", driver_listing)
    monkeypatch.setattr(listing, "DRIVER_LISTING_KEYS", 0)
    opts = s3_server.storage_options()
    cfg = job_config("s3://first-lib/photos", "s3://first-out/emb", checkpoint,
                     input={"storage_options": opts, "images_per_shard": 4}, output={"storage_options": opts})
    report = run(cfg)
    assert report["complete"] and report["counts"]["this_run"]["images"] == 12
    assert report["listing"]["tasks"] >= 2  # the root's files and its 4 folders, dealt to several listers
    assert report["skipped_files"] == ["notes.txt"]
    fs = s3_server.filesystem()
    ids = []
    for p in fs.find("first-out/emb"):
        if p.rsplit("/", 1)[-1].startswith("part-"):
            ids += pq.read_table(fs.open(p, "rb"), columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
