"""Transient versus permanent failure: a store that dies mid-run and comes back is ridden out; a shard that
keeps failing ends the run (exit 1) after max_attempts, naming the shard, with everything else written."""
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from PIL import Image

from resnet_batch.errors import RunFailed
from resnet_batch.embed.runner import run
from resnet_batch.dev.sample_data import make_sample_photos
from tests.helpers.jobs import job_config
from tests.helpers.s3server import S3Server
from tests.helpers.standin import PoisonEmbedder

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _ids(out) -> list[str]:
    return pads.dataset(str(out), format="parquet").to_table(columns=["image_id"]).column("image_id").to_pylist()


def test_poison_shard_fails_the_run_naming_it_after_max_attempts(tmp_path, checkpoint, ray_local):
    photos = tmp_path / "photos"
    make_sample_photos(photos, 12, per_folder=12, seed=3)
    Image.new("RGB", (320, 240), (0, 0, 0)).save(photos / "shard-000" / "zz-black.jpg", quality=90)
    out = tmp_path / "out"
    cfg = job_config(photos, out, checkpoint, input={"images_per_shard": 4}, compute={"max_attempts": 2})
    with pytest.raises(RunFailed) as err:
        run(cfg, embedder=PoisonEmbedder)
    message = str(err.value)
    assert message.startswith("1 shard(s) failed 2 times: shard 3 (")
    assert "zz-black.jpg" not in message or "shard-000" in message
    assert "RuntimeError: poison: an all-black image makes this model raise" in message
    report = err.value.report
    assert report["complete"] is False and report["failed_shards"][0]["attempts"] == 2
    assert len(_ids(out)) == 12 and not (out / "_SUCCESS").exists()  # the other shards are written
    # the next run, with a model that does not raise, finishes the shard
    report = run(cfg)
    assert report["complete"] and report["counts"]["this_run"]["images"] == 1 and len(set(_ids(out))) == 13


@pytest.fixture
def flaky_store(tmp_path_factory):
    """A SeaweedFS server of its own (this test kills it)."""
    with S3Server(tmp_path_factory.mktemp("seaweedfs-outage")) as server:
        yield server


def test_store_outage_mid_run_is_ridden_out(flaky_store, tmp_path, checkpoint, ray_local):
    """The S3 server is killed after the first part and restarted on the same ports and data 30 s later:
    the run (in this process, on the session's Ray) rides it out (reads, part writes, the ledger and the lock
    retry) and ends complete, every image exactly once."""
    photos = tmp_path / "photos"
    make_sample_photos(photos, 32, per_folder=16, seed=4)
    flaky_store.make_bucket("outage-in")
    flaky_store.make_bucket("outage-out")
    flaky_store.upload_dir(photos, "outage-in/photos")
    options = flaky_store.storage_options()
    cfg = job_config("s3://outage-in/photos", "s3://outage-out/emb", checkpoint,
                     input={"images_per_shard": 4, "storage_options": options}, output={"storage_options": options},
                     compute={"batch_size": 4})
    finished, outage = threading.Event(), {}

    def take_the_store_down():
        fs = flaky_store.filesystem()
        deadline = time.time() + 240
        while not [p for p in (fs.ls("outage-out/emb", refresh=True) if fs.exists("outage-out/emb") else [])
                   if p.endswith(".parquet") and "/part-" in p]:
            if finished.is_set() or time.time() > deadline:
                return
            time.sleep(0.2)
        flaky_store.crash()
        outage["down"] = time.time()
        time.sleep(30)
        outage["running_after_30s"] = not finished.is_set()  # still waiting for the store, not failed
        flaky_store.restart()

    chaos = threading.Thread(target=take_the_store_down, daemon=True)
    chaos.start()
    try:
        report = run(cfg, progress=False)
    finally:
        finished.set()
        chaos.join(timeout=120)
    assert outage.get("running_after_30s") is True, outage
    assert report["complete"] and report["counts"]["ok"] == 32 and report["counts"]["failed"] == 0
    fs = flaky_store.filesystem()
    parts = [p for p in fs.ls("outage-out/emb", refresh=True) if p.rsplit("/", 1)[-1].startswith("part-")]
    assert len(parts) == 8 and fs.exists("outage-out/emb/_SUCCESS")
    import pyarrow.parquet as pq

    ids = [i for p in parts for i in pq.read_table(fs.open(p, "rb"), columns=["image_id"]).column("image_id").to_pylist()]
    assert sorted(ids) == sorted(Path(p).relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
