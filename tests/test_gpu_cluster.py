"""GPU scheduling on a real autoscaling Ray cluster: fractional GPUs, the actor pool growing with the
nodes the autoscaler adds (Ray #59144), compute.device, and a GPU node lost in the middle of a run.

The head runs Ray's autoscaler with its `fake_multinode` provider (tests/helpers/raycluster.py): the
autoscaler itself starts `gpu` worker nodes (2 CPUs and one *logical* GPU each, 1 to 2 nodes) as
local processes. Ray schedules on those GPUs for real (placement, fractions, autoscaling); torch
in the actors finds no CUDA device, which is what compute.device decides about.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from resnet_batch.dev.sample_data import make_sample_photos
from tests.helpers.raycluster import BIN, REPO, LoopbackCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_ray, pytest.mark.cluster]

GPU_NODE = {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 300 << 20}, "min_workers": 1, "max_workers": 2}


@pytest.fixture(scope="module")
def gpu_cluster():
    """A 2-CPU head (no GPU) whose autoscaler keeps 1 and adds up to 2 `gpu` nodes."""
    root = Path(tempfile.mkdtemp(prefix="rb-gpu-", dir="/tmp"))  # short: Unix socket paths
    c = LoopbackCluster(root)
    try:
        c.start_head(num_cpus=2, resources={"head_node": 1}, autoscaling={"gpu": GPU_NODE})
        c.wait_for_nodes(2)  # the head + the gpu node kept by min_workers
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not c.processes(), f"cluster processes left running: {c.processes()}"


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    """960 photos: enough work (about a minute with the stand-in model) for the cluster to change under a run."""
    root = tmp_path_factory.mktemp("many-photos")
    make_sample_photos(root, 960, per_folder=20, seed=5)
    return root


STANDIN_BATCH_S = "0.5"  # the stand-in model's seconds a batch: on one actor a 960-photo run lasts about a minute


def _embed_cmd(c: LoopbackCluster, photos: Path, out: Path, *overrides: str, standin: bool = False) -> list[str]:
    """The embed CLI as a driver on this cluster (random bf16 weights: speed, not values, matters here). With
    `standin`, the same command with a device-like stand-in model (tests/helpers/standin_cli.py): the runs
    that must last while the cluster changes under them then wait as on a GPU instead of burning the CPU."""
    command = [sys.executable, "-m", "tests.helpers.standin_cli", STANDIN_BATCH_S] if standin \
        else [str(BIN / "resnet-batch")]
    return [*command, "embed", "--config", str(REPO / "configs/local.yaml"), "--quiet",
            "--input", str(photos), "--output", str(out), "-o", f"compute.ray_address={c.address}",
            "-o", "compute.torch_threads=1", "-o", "compute.decode_batch_size=4", *overrides]


def _driver_env(c: LoopbackCluster) -> dict:
    return {**c.env, "PYTHONPATH": str(REPO)}


def _embed(c: LoopbackCluster, photos: Path, out: Path, *overrides: str, standin: bool = False):
    res = subprocess.run(_embed_cmd(c, photos, out, *overrides, standin=standin), env=_driver_env(c), cwd=c.root,
                         capture_output=True, text=True, timeout=600)
    return res, res.stdout + res.stderr, _report(out)


def _report(out: Path) -> dict | None:
    report = out / "_run_report.json"
    return json.loads(report.read_text()) if report.exists() else None


def _gpu_nodes(c: LoopbackCluster) -> dict[str, dict]:
    return {n["node_id"]: n for n in c.alive_nodes() if n["resources_total"].get("GPU")}


def test_half_a_gpu_per_actor_packs_two_replicas_on_one_gpu(gpu_cluster, photos, tmp_path):
    gpu_cluster.wait_for_nodes(2)
    gpu_nodes = _gpu_nodes(gpu_cluster)
    res, logs, report = _embed(gpu_cluster, photos, tmp_path / "out", "-o", "compute.gpus_per_actor=0.5",
                               "-o", "compute.min_actors=2", "-o", "compute.max_actors=2",
                               "-o", "input.images_per_shard=6", "-o", "compute.batch_size=6")
    assert res.returncode == 0, logs[-4000:]
    assert report["complete"] and report["counts"]["ok"] == 36 and report["gpu_requested"] is True
    actors = report["actors"]
    assert len(actors) == 2 and len({a["actor"] for a in actors}) == 2  # two replicas ...
    assert len({a["node"] for a in actors}) == 1 and actors[0]["node"] in gpu_nodes  # ... on one 1-GPU node
    assert sum(a["images"] for a in actors) == 36
    # torch has no CUDA here: the actors ran on the CPU, and the summary says so
    assert report["device"] == "cpu (no CUDA)"
    assert "warning: 2 model actor(s) were given a GPU but their torch sees no CUDA device" in logs
    assert pq.read_table(tmp_path / "out").num_rows == 36


def test_actor_pool_grows_with_the_gpu_nodes_the_autoscaler_adds(gpu_cluster, many_photos, tmp_path):
    """One GPU node at the start and max_actors=2: when decoded blocks keep waiting for the busy actor, the
    pool starts a second one; it needs a GPU node that does not exist yet, the autoscaler adds it, and the
    second actor embeds on that new node."""
    photos = many_photos
    gpu_cluster.wait_for_nodes(2)  # an extra node from an earlier test has been let go (idle)
    before = _gpu_nodes(gpu_cluster)
    assert len(before) == 1
    res, logs, report = _embed(gpu_cluster, photos, tmp_path / "out", "-o", "compute.min_actors=1",
                               "-o", "compute.max_actors=2", "-o", "input.images_per_shard=20", standin=True)
    assert res.returncode == 0, logs[-4000:]
    assert report["complete"] and report["counts"]["ok"] == 960
    nodes = {a["node"]: a["images"] for a in report["actors"]}
    assert len(report["actors"]) == 2 and len(nodes) == 2, report["actors"]  # one actor per GPU node
    added = set(nodes) - set(before)
    assert len(added) == 1 and nodes[added.pop()] > 0  # the new node's actor did real work
    assert sum(nodes.values()) == 960 and report["per_node"] == nodes


def test_device_cuda_fails_the_run_where_torch_has_no_cuda(gpu_cluster, photos, tmp_path):
    out = tmp_path / "out"
    res, logs, report = _embed(gpu_cluster, photos, out, "-o", "compute.device=cuda")
    assert res.returncode == 1, logs[-4000:]
    error = [line for line in res.stderr.splitlines() if line.startswith("error: the run did not finish:")]
    assert error and "no model actor could start: RuntimeError: compute.device=cuda: this model actor was given " \
                     "a GPU by Ray" in error[0], error
    assert "sees no CUDA device" in error[0]
    assert not (out / "_SUCCESS").exists() and not list(out.glob("part-*.parquet"))


def test_a_gpu_node_lost_mid_run_costs_no_image(gpu_cluster, many_photos, tmp_path):
    """A GPU node taken away mid-run (a spot preemption: its raylet SIGKILLed): Ray restarts the actor
    and redoes the lost work, and the run completes with every image exactly once."""
    gpu_cluster.wait_for_nodes(2)
    out = tmp_path / "out"
    cmd = _embed_cmd(gpu_cluster, many_photos, out, "-o", "compute.min_actors=2", "-o", "compute.max_actors=2",
                     "-o", "input.images_per_shard=20", standin=True)
    with subprocess.Popen(cmd, env=_driver_env(gpu_cluster), cwd=gpu_cluster.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as job:
        logs: list[str] = []
        reader = threading.Thread(target=lambda: logs.extend(job.stdout), daemon=True)
        reader.start()
        while len(list(out.glob("part-*.parquet"))) < 6 and job.poll() is None:
            time.sleep(0.5)
        assert job.poll() is None, "".join(logs)[-4000:]  # still running: both actors (2 GPU nodes) busy
        victim = max(_gpu_nodes(gpu_cluster))  # the newer of the two (fake node ids count up)
        gpu_cluster.kill_node(victim)
        rc = job.wait(timeout=600)
        reader.join(10)
    text = "".join(logs)
    assert rc == 0, text[-4000:]
    report = _report(out)
    assert report["complete"] and report["counts"]["ok"] == 960 and (out / "_SUCCESS").exists()
    assert report["per_node"].get(victim, 0) > 0  # the lost node had done work before it went
    ids = pq.read_table(out, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 960  # nothing lost, nothing twice
