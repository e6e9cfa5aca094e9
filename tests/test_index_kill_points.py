"""An `index` update killed at each of its commit points (os._exit from a test-only hook): the index in the
folder stays the one before or the one after, and one rerun brings it to exactly the current embeddings."""
from __future__ import annotations

import json
import shutil

import pytest

from resnet_batch.cli import main
from resnet_batch.search.index import SimilarityIndex, UnknownImageId
from tests.helpers.search import clustered_vectors, write_part

POINTS = ["staged", "generation", "switched", "cleaned"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("idxkill")
    emb = root / "emb"
    for p in range(4):
        write_part(emb / f"part-{p:06d}.parquet", [f"img-{p}-{i:03d}" for i in range(100)],
                   clustered_vectors(100, seed=p))
    idx = root / "idx"
    assert main(["index", "--embeddings", str(emb), "--out", str(idx)]) == 0
    assert main(["index", "--embeddings", str(emb), "--out", str(idx), "--rebuild"]) == 0  # a generation layout
    return root, emb, idx


def changed_embeddings(emb0, tmp_path):
    """The embeddings after a night: one part of 100 rows gone, one of 50 new rows."""
    emb = tmp_path / "emb"
    shutil.copytree(emb0, emb)
    (emb / "part-000001.parquet").unlink()  # 100 rows leave
    write_part(emb / "part-000009.parquet", [f"new-{i:03d}" for i in range(50)], clustered_vectors(50, seed=9))
    return emb


def kill_then_rerun(drivers, point: str, emb, uri: str, opts: dict) -> None:
    """An update killed at `point` (in a process forked for it, see killpoints.Forks); the folder opens as a
    whole index; one rerun converges."""
    spec = {"index": uri, "embeddings": str(emb), "point": point, "storage_options": opts}
    returncode, log = drivers.run(spec)
    assert returncode == 137, log
    before = SimilarityIndex.open(uri, opts)  # readers see a whole index, the old one or the new one
    assert len(before) in (400, 350)
    options = ["--storage-options", json.dumps(opts)] if opts else []
    assert main(["index", "--embeddings", str(emb), "--out", uri, *options]) == 0
    after = SimilarityIndex.open(uri, opts)
    assert len(after) == 350
    assert after.faiss_id("new-000") is not None
    with pytest.raises(UnknownImageId):
        after.faiss_id("img-1-000")


@pytest.mark.parametrize("point", POINTS)
def test_an_index_update_killed_at_each_commit_point_converges_on_one_rerun(built, tmp_path, killed_drivers, point):
    root, emb0, idx0 = built
    idx = tmp_path / "idx"
    shutil.copytree(idx0, idx)
    kill_then_rerun(killed_drivers, point, changed_embeddings(emb0, tmp_path), str(idx), {})
    assert not (idx / "_lock").exists()


@pytest.mark.s3
@pytest.mark.parametrize("point", POINTS)
def test_an_index_update_on_s3_killed_at_each_commit_point_converges_on_one_rerun(built, tmp_path, point, s3_server,
                                                                                  killed_drivers, monkeypatch):
    """The same on the S3 server the tests start, at every commit point (the killed run's lock is taken over by
    the rerun)."""
    root, emb0, idx0 = built
    monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "cache"))
    fs = s3_server.filesystem()
    bucket = s3_server.make_bucket(f"idxkill-{point}")
    for path in idx0.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/idx/{path.relative_to(idx0).as_posix()}")
    kill_then_rerun(killed_drivers, point, changed_embeddings(emb0, tmp_path), f"s3://{bucket}/idx", s3_server.storage_options())
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/idx/_lock")
