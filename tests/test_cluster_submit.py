"""The cluster path for real: `ray start --head` + a second `ray start --address` node on loopback,
the embed job sent with `ray job submit --working-dir`, token auth on.

The cluster is private to this module: its own ports, its own temp dirs, its own token file
(RAY_AUTH_TOKEN_PATH, so ~/.ray/auth_token is neither read nor written), no RAY_ADDRESS exported
and no `ray_current_cluster` file in the default temp dir, so other processes' `ray.init()` never
find it. Every `ray start` runs in a new session; teardown signals exactly the processes of those
sessions (`ray stop` would stop every Ray runtime on the machine).
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.s3server import free_ports

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_range(n: int) -> tuple[int, int]:
    """n consecutive free ports for worker processes, outside Ray's default 10002-19999 and the
    ephemeral range, so neither a default `ray.init()` nor a port-0 bind collides with them."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - n)
        try:
            _free_ports_at(range(base, base + n))
            return base, base + n - 1
        except OSError:
            continue
    raise RuntimeError("no free worker port range found")


def _free_ports_at(ports) -> None:
    socks = []
    try:
        for p in ports:
            s = socket.socket()
            s.bind(("0.0.0.0", p))
            socks.append(s)
    finally:
        for s in socks:
            s.close()


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # fields after "(comm)": state ppid pgrp session


class LoopbackCluster:
    """A head and worker nodes on 127.0.0.1, started and stopped through the `ray` CLI."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = root / "ray"
        self.token_file = root / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.sessions: list[int] = []
        self.gcs_port = self.dashboard_port = 0
        autoscaler_metrics, dashboard_metrics = free_ports(2)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in the job = this venv
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
            AUTOSCALER_METRIC_PORT=str(autoscaler_metrics),  # Ray's fixed defaults (44217, 44227)
            DASHBOARD_METRIC_PORT=str(dashboard_metrics),  # would collide with another head here
            # Start dispatching only when all min_actors are up: else the first actor ready can take
            # all of a small input while the other node's actor is still loading torch.
            RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="180",
        )

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], num_cpus: int, resources: dict) -> None:
        node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = free_ports(6)
        low, high = _free_range(60)
        # One temp dir per node, as on separate machines: nodes sharing one would also share the
        # runtime-env folders, and a node unpacking the job's working dir replaces the driver's cwd.
        temp_dir = self.temp_dir / f"node{len(self.sessions)}"
        cmd = [RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
               "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
               "--min-worker-port", str(low), "--max-worker-port", str(high),
               "--num-cpus", str(num_cpus), "--num-gpus", "0", "--resources", json.dumps(resources),
               "--object-store-memory", str(300 << 20), "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.sessions.append(proc.pid)  # its daemons keep this session id after `ray start` exits
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start {' '.join(args)}` failed ({proc.returncode}):\n{out[-3000:]}")

    def start_head(self, num_cpus: int, resources: dict) -> None:
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        self._start(["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(client)], num_cpus, resources)

    def add_node(self, num_cpus: int, resources: dict) -> None:
        self._start(["--address", f"127.0.0.1:{self.gcs_port}"], num_cpus, resources)

    def ray(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this cluster's dashboard (the Jobs API)."""
        return subprocess.run([RAY, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def get(self, path: str, token: str | None) -> tuple[int, dict | None]:
        """GET a dashboard endpoint with (or without) a bearer token: (HTTP status, JSON body)."""
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, None

    def processes(self) -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _session_of(int(p)) in self.sessions]

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM every process of this cluster's sessions, SIGKILL what is left after grace_s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.processes()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while pids and self.processes() and time.monotonic() < deadline:
                time.sleep(0.25)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


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


def _nodes(c: LoopbackCluster) -> list[dict]:
    status, body = c.get("/api/v0/nodes", c.token_file.read_text())
    assert status == 200, status
    return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _submit_embed(c: LoopbackCluster, submission_id: str, *args: str) -> subprocess.CompletedProcess:
    return c.ray("job", "submit", "--address", c.dashboard, "--working-dir", str(REPO),
                 "--submission-id", submission_id, "--",
                 "python", "jobs/embed.py", "--config", "configs/local.yaml", "--quiet", *args, timeout=300)


def _job_status(c: LoopbackCluster, submission_id: str) -> str:
    status, body = c.get(f"/api/jobs/{submission_id}", c.token_file.read_text())
    assert status == 200, status
    return body["status"]


def test_cluster_has_two_alive_nodes(cluster):
    nodes = _nodes(cluster)
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
    assert "per node:" in logs

    report = json.loads((out / "_run_report.json").read_text())
    assert report["complete"] and (out / "_SUCCESS").exists()
    assert report["counts"]["ok"] == 36
    node_ids = {n["node_id"][:12] for n in _nodes(cluster)}
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
    from resnet_batch.model import ResNet50Embedder

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
