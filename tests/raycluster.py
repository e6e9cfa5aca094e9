"""raycluster module: real Ray nodes on loopback for tests, started and stopped through the `ray` CLI.

`LoopbackCluster` gives each node its own ports and temp dir, turns token authentication on with
a private token file (RAY_AUTH_TOKEN_PATH, so ~/.ray/auth_token is neither read nor written),
exports no RAY_ADDRESS and writes no `ray_current_cluster` file in the default temp dir, so other
processes' `ray.init()` never find it. Every `ray start` runs in a new session; `stop` signals
exactly the processes of those sessions (`ray stop` would stop every Ray runtime on the machine).

With `start_head(..., autoscaling=node_types)` the head runs Ray's autoscaler with its
`fake_multinode` provider: worker nodes of the given types (logical GPUs included) are started
and stopped on this machine by the autoscaler itself, as cloud VMs would be.
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
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.s3server import free_ports

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


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

    def _start(self, args: list[str], num_cpus: int, resources: dict, env: dict | None = None) -> None:
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
        proc = subprocess.Popen(cmd, env={**self.env, **(env or {})}, cwd=self.root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.sessions.append(proc.pid)  # its daemons keep this session id after `ray start` exits
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start {' '.join(args)}` failed ({proc.returncode}):\n{out[-3000:]}")

    def start_head(self, num_cpus: int, resources: dict, autoscaling: dict | None = None) -> None:
        """The head; with `autoscaling` (worker node types as in a cluster launcher config) it also
        runs the autoscaler, which starts and stops worker nodes of those types on this machine."""
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        args = ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(client)]
        env = None
        if autoscaling:
            config = self.root / "autoscaling.json"
            config.write_text(json.dumps(_fake_autoscaling_config(self.gcs_port, num_cpus, resources, autoscaling)))
            args.append(f"--autoscaling-config={config}")
            env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self._start(args, num_cpus, resources, env)

    @property
    def address(self) -> str:
        """The GCS address, for a driver (`ray.init(address=...)`, `compute.ray_address`)."""
        return f"127.0.0.1:{self.gcs_port}"

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes (the dashboard's state API): node_id, resources_total, ..."""
        status, body = self.get("/api/v0/nodes", self.token_file.read_text())
        assert status == 200, status
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(nodes := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} alive nodes after {timeout_s}s, expected {count}")
            time.sleep(1)
        return nodes

    def run(self, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a command (e.g. a driver: `resnet-batch embed -o compute.ray_address=...`) with this
        cluster's token."""
        return subprocess.run(list(cmd), env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout)

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

    def kill_node(self, node_id: str) -> None:
        """SIGKILL a node's raylet, as when a (spot) machine is taken away; its workers die with it."""
        for pid in self.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[0].endswith(b"raylet") and f"--node_id={node_id}".encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
                return
        raise LookupError(f"no raylet of node {node_id} in this cluster")

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


def _fake_autoscaling_config(gcs_port: int, head_cpus: int, head_resources: dict, node_types: dict) -> dict:
    """A cluster launcher config for Ray's `fake_multinode` provider (nodes are local processes)."""
    return {
        "cluster_name": "loopback",
        "max_workers": sum(t["max_workers"] for t in node_types.values()),
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus, "GPU": 0, **head_resources}, "node_config": {},
                                 "max_workers": 0},
            **{name: {"node_config": {}, **t} for name, t in node_types.items()},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        **{k: {} for k in ("auth", "docker", "file_mounts")},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts_sync_continuously": False,
    }
