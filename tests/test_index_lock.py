"""Two first `index` builds into one new folder at once: the folder's lock lets one build while the other is
refused (or, once the first is done, finds the index current); the folder holds one complete index."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

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
