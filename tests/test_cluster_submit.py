"""The cluster path for real: `ray start --head` + a second `ray start --address` node on loopback,
the embed job sent with `ray job submit --working-dir`, token auth on. The cluster is private to
this module (resnet_batch/dev/localcluster.py, through tests/helpers/raycluster.py).
"""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers.raycluster import REPO, LoopbackCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_ray, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster():
    """A head (3 logical CPUs) and a second node (3 CPUs + a `second_node` resource)."""
    root = Path(tempfile.mkdtemp(prefix="rb-cluster-", dir="/tmp"))  # short: Unix socket paths
    c = LoopbackCluster(root)
    try:
        c.start_head(num_cpus=3, resources={"head_node": 1})
        c.add_node(num_cpus=3, resources={"second_node": 1})
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not c.processes(), f"cluster processes left running: {c.processes()}"


def _submit_embed(c: LoopbackCluster, submission_id: str, *args: str) -> subprocess.CompletedProcess:
    return c.ray("job", "submit", "--address", c.dashboard, "--working-dir", str(REPO),
                 "--submission-id", submission_id, "--",
                 "python", "jobs/embed.py", "--config", "configs/local.yaml", "--quiet", *args, timeout=300)


def _job_status(c: LoopbackCluster, submission_id: str) -> str:
    status, body = c.get(f"/api/jobs/{submission_id}", c.token_file.read_text())
    assert status == 200, status
    return body["status"]


def test_cluster_has_two_alive_nodes(cluster):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    resources = [n["resources_total"] for n in nodes]
    assert sorted("head_node" in r for r in resources) == [False, True]
    assert sorted("second_node" in r for r in resources) == [False, True]
    assert all(r["CPU"] == 3 for r in resources)


def test_job_submit_spreads_over_both_nodes(cluster, photos, checkpoint, tmp_path):
    """36 photos, two actors that each need 2 of a node's 3 CPUs: one actor per node, both used."""
    out = tmp_path / "out"
    res = _submit_embed(
        cluster, "embed-ok", "--input", str(photos), "--output", str(out),
        "-o", f"model.weights={checkpoint}", "-o", "model.precision=fp32",
        "-o", "compute.min_actors=2", "-o", "compute.max_actors=2", "-o", "compute.cpus_per_actor=2",
        "-o", "compute.torch_threads=1", "-o", "compute.decode_cpus=1", "-o", "input.images_per_shard=6",
        "-o", "compute.batch_size=6", "-o", "compute.decode_batch_size=3")
    logs = res.stdout + res.stderr
    assert res.returncode == 0, logs[-4000:]
    assert _job_status(cluster, "embed-ok") == "SUCCEEDED"
    assert "resnet-batch: complete" in logs and "36 ok, 0 failed" in logs  # the summary is in the job logs

    report = json.loads((out / "_run_report.json").read_text())
    assert "per node:" in logs, report["actors"]
    assert report["complete"] and (out / "_SUCCESS").exists()
    assert report["counts"]["ok"] == 36
    node_ids = {n["node_id"] for n in cluster.alive_nodes()}
    assert set(report["per_node"]) == node_ids, (report["per_node"], node_ids)  # work on both nodes
    assert all(v > 0 for v in report["per_node"].values()) and sum(report["per_node"].values()) == 36
    assert report["stages"]["model_actors"] == 2

    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.num_rows == 36 and set(table.column("status").to_pylist()) == {"ok"}
    _check_against_local_model(table, photos, checkpoint)


def _check_against_local_model(table, photos: Path, checkpoint: Path) -> None:
    """Two rows of the cluster's output equal a forward pass computed here, in this process."""
    import torch

    from resnet_batch.decode import PreprocessSpec, decode_image
    from resnet_batch.network import ResNet50Embedder

    rows = table.sort_by("image_id").slice(0, 2).to_pylist()
    spec = PreprocessSpec.from_weights("IMAGENET1K_V2")
    pixels = np.stack([decode_image((photos / r["image_id"]).read_bytes(), spec, max_pixels=10**8, draft=True)[0]
                       for r in rows])
    embedder = ResNet50Embedder(torch.load(checkpoint, weights_only=True), spec, precision="fp32", device="cpu")
    emb, logits = embedder.embed(pixels)
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), emb.numpy(), rtol=1e-3, atol=1e-3)
    assert [r["topk_ids"][0] for r in rows] == logits.argmax(1).tolist()


def test_failed_job_exits_nonzero_and_shows_failed(cluster, checkpoint, tmp_path):
    res = _submit_embed(cluster, "embed-bad-input", "--input", str(tmp_path / "no-such-folder"),
                        "--output", str(tmp_path / "out"), "-o", f"model.weights={checkpoint}")
    logs = res.stdout + res.stderr
    assert res.returncode != 0, logs[-3000:]
    assert "error:" in logs and "no-such-folder" in logs  # the job's own message reaches the submitter
    assert "Job 'embed-bad-input' failed" in logs
    assert _job_status(cluster, "embed-bad-input") == "FAILED"
    status = cluster.ray("job", "status", "--address", cluster.dashboard, "embed-bad-input")
    assert status.returncode == 0
    assert "Job 'embed-bad-input' failed" in status.stdout + status.stderr
    assert "exit code 2" in status.stdout + status.stderr  # embed's usage-error exit status


def test_client_without_the_token_is_refused(cluster, tmp_path):
    token = cluster.token_file.read_text()
    assert cluster.get("/api/jobs/", token)[0] == 200
    assert cluster.get("/api/jobs/", None)[0] in (401, 403)
    assert cluster.get("/api/jobs/", secrets.token_hex(32))[0] in (401, 403)

    # The CLI with no token anywhere (empty HOME, no RAY_AUTH_* variables) cannot submit a job.
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)
    res = cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", "intruder",
                      "--no-wait", "--", "echo", "hi", env=env, timeout=120)
    assert res.returncode != 0
    assert "auth" in (res.stdout + res.stderr).lower()
    assert cluster.get("/api/jobs/intruder", token)[0] == 404  # nothing was created
