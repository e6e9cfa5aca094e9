"""Two first `index` builds into one new folder at once: the folder's lock lets one build while the other is
refused (or, once the first is done, finds the index current); the folder holds one complete index. A build or
an update whose lock was taken over publishes nothing and exits 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from resnet_batch.cli import main
from resnet_batch.search import folder
from resnet_batch.search.index import SimilarityIndex
from tests.helpers.jobs import REPO
from tests.helpers.search import clustered_vectors, write_part


def test_two_first_builds_racing_publish_one_index(tmp_path):
    emb = tmp_path / "emb"
    for p in range(3):
        ids = [f"img-{p}-{i:03d}" for i in range(200)]
        write_part(emb / f"part-{p:06d}.parquet", ids, clustered_vectors(200, seed=p))
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "resnet_batch.cli", "index", "--embeddings", str(emb), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), logs
    if codes == [0, 2]:
        assert any("in use by another run" in log for log in logs), logs
    index = SimilarityIndex.open(str(out))
    assert len(index) == 600
    assert not (out / "_lock").exists()
    np.testing.assert_equal(len(index.meta["part_uris"]), 3)


@pytest.mark.parametrize("first", [True, False], ids=["first-build", "update"])
def test_an_index_run_whose_lock_was_taken_over_publishes_nothing_and_exits_1(tmp_path, monkeypatch, capsys, first):
    """Issue 18: the index checks it still owns the folder's lock before it publishes (a run paused past the
    stale limit was taken over: the other run owns the folder now), as the embed job's commit points do."""
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    for p in range(2):
        write_part(emb / f"part-{p:06d}.parquet", [f"img-{p}-{i:03d}" for i in range(100)],
                   clustered_vectors(100, seed=p))
    if not first:
        assert main(["index", "--embeddings", str(emb), "--out", str(idx)]) == 0
        write_part(emb / "part-000002.parquet", [f"new-{i:03d}" for i in range(50)], clustered_vectors(50, seed=2))
    before = {name: (idx / name).read_bytes() for name in os.listdir(idx)} if not first else {}
    other = {"host": "elsewhere", "pid": 4242, "token": "the-other-run", "started": time.time(),
             "heartbeat": time.time()}

    def taken_over_first(publish):
        def taken_over(self, *args):  # what a takeover leaves: another holder's lock, put in place atomically
            (idx / ".other-lock").write_text(json.dumps(other))
            os.replace(idx / ".other-lock", idx / "_lock")
            return publish(self, *args)
        return taken_over

    monkeypatch.setattr(folder.Staging, "publish", taken_over_first(folder.Staging.publish))
    monkeypatch.setattr(folder.Staging, "publish_generation", taken_over_first(folder.Staging.publish_generation))
    assert main(["index", "--embeddings", str(emb), "--out", str(idx)]) == 1
    err = capsys.readouterr().err
    assert f"this run lost the lock on {idx}: the lock was taken over by pid 4242 on elsewhere" in err, err
    after = {name: (idx / name).read_bytes() for name in os.listdir(idx)}
    assert json.loads(after.pop("_lock"))["token"] == "the-other-run"  # the winner's lock is left alone
    before.pop("_lock", None)
    assert after == before  # nothing published, moved or removed: no index.json of a first build, the old one kept
