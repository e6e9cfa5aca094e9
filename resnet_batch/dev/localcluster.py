"""localcluster module: a real multi-node Ray cluster on this machine, for trying the cluster path and for tests.

`LocalCluster` starts a head and further nodes on 127.0.0.1 through the `ray` CLI, as separate machines
would run them: each node has its own ports and its own temp dir (nodes sharing one would share the
runtime-env folders, and a node unpacking a job's working dir would pull the driver's cwd away from
under it). Token authentication is on, with a private token file (RAY_AUTH_TOKEN_PATH), so
~/.ray/auth_token is neither read nor written. No RAY_ADDRESS is exported and no `ray_current_cluster`
file lands in the default temp dir, so other processes' `ray.init()` never find the cluster. Every
`ray start` runs in a new session; `stop` signals exactly the processes of those sessions (`ray stop`
would stop every Ray runtime on the machine). Linux: processes are found through /proc.

`make cluster-demo` (cluster_demo.py) starts two such nodes, submits the embed job with `ray job submit`,
shows the images each node embedded and stops the nodes again; the cluster tests start theirs here too.
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
from typing import Callable, Optional

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").exists() else (shutil.which("ray") or "ray")
OBJECT_STORE_BYTES = 300 << 20  # per node: enough for a demo, small enough for several nodes on one machine
START_ATTEMPTS = 3
STARTUP_TIMED_OUT = "timed out during startup"  # Ray's words when a node did not register within its fixed 30 s
RETRYABLE_START = (STARTUP_TIMED_OUT, "Deadline Exceeded", "ddress already in use")  # load, port races


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while choosing, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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


def _session_of(pid: int) -> Optional[int]:
    try:
        return os.getsid(pid)
    except OSError:  # gone, or not ours to ask about
        return None


def _zombie(pid: int) -> bool:
    """Dead and waiting for its parent (init, for a daemon) to reap it: nothing left to signal."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


class LocalCluster:
    """A head and further nodes on 127.0.0.1, started and stopped through the `ray` CLI. `root` holds the
    token file and the nodes' temp dirs: keep it short (Ray's Unix socket paths live under it)."""

    def __init__(self, root: Path, object_store_bytes: int = OBJECT_STORE_BYTES):
        self.root = Path(root)
        self.object_store_bytes = object_store_bytes
        self.temp_dir = self.root / "ray"
        self.token_file = self.root / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.sessions: list[int] = []
        self.gcs_port = self.dashboard_port = 0
        autoscaler_metrics, dashboard_metrics = free_ports(2)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in a job = this environment's
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
            AUTOSCALER_METRIC_PORT=str(autoscaler_metrics),  # Ray's fixed defaults (44217, 44227)
            DASHBOARD_METRIC_PORT=str(dashboard_metrics),  # would collide with another head here
            # Ray Data actor pools (neighbours) start dispatching only when all their min actors are up: else
            # the first actor ready can take all of a small input while the other node's is still loading torch.
            RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="180",
        )

    # -- nodes -----------------------------------------------------------------------------------
    def _start(self, args: Callable[[], list[str]], num_cpus: float, resources: dict,
               env: Optional[dict] = None) -> None:
        """Start a node with `ray start`, its arguments from `args()` (called again for each attempt, so
        a retry gets fresh ports). Ray gives a new node a fixed 30 s to register with the GCS; on a
        loaded machine that can pass, and so can a port taken between choosing and binding it. Such a
        start is stopped (its half-started daemons too) and tried again, up to START_ATTEMPTS times;
        any other failure is raised at once."""
        for attempt in range(1, START_ATTEMPTS + 1):
            node_args = args()
            session, returncode, out = self._ray_start(node_args, num_cpus, resources, env)
            if returncode == 0:
                return
            self._signal([session])
            if attempt == START_ATTEMPTS or not any(m in out for m in RETRYABLE_START):
                tries = f" (attempt {attempt} of {START_ATTEMPTS})" if attempt > 1 else ""
                raise RuntimeError(f"`ray start {' '.join(node_args)}` failed ({returncode}){tries}:\n{out[-3000:]}")

    def _ray_start(self, args: list[str], num_cpus: float, resources: dict,
                   env: Optional[dict]) -> tuple[int, int, str]:
        """One `ray start` in a new session of its own: (session id, exit status, its output)."""
        node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = free_ports(6)
        low, high = _free_range(max(60, int(num_cpus) + 40))  # a port per worker: one per logical CPU, and more
        temp_dir = self.temp_dir / f"node{len(self.sessions)}"
        cmd = [RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
               "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
               "--min-worker-port", str(low), "--max-worker-port", str(high),
               "--num-cpus", str(num_cpus), "--num-gpus", "0", "--resources", json.dumps(resources),
               "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, env={**self.env, **(env or {})}, cwd=self.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.sessions.append(proc.pid)  # its daemons keep this session id after `ray start` exits
        out, _ = proc.communicate(timeout=120)
        return proc.pid, proc.returncode, out

    def _head_args(self) -> list[str]:
        """The head's own arguments, on fresh ports (sets gcs_port and dashboard_port)."""
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        return ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(client)]

    def start_head(self, num_cpus: float, resources: Optional[dict] = None) -> None:
        self._start(self._head_args, num_cpus, resources or {})

    def add_node(self, num_cpus: float, resources: Optional[dict] = None) -> None:
        self._start(lambda: ["--address", self.address], num_cpus, resources or {})

    @property
    def address(self) -> str:
        """The GCS address, for a driver (`ray.init(address=...)`, `compute.ray_address`)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard's URL: the Jobs API (`ray job submit --address ...`) and the state API."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    # -- talking to it ---------------------------------------------------------------------------
    def get(self, path: str, token: Optional[str]) -> tuple[int, Optional[dict]]:
        """GET a dashboard endpoint with (or without) a bearer token: (HTTP status, JSON body)."""
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, None

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes (the dashboard's state API): node_id, is_head_node, resources_total, ..."""
        status, body = self.get("/api/v0/nodes", self.token_file.read_text())
        if status != 200:
            raise RuntimeError(f"the dashboard's node list answered HTTP {status}")
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(nodes := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} alive nodes after {timeout_s}s, expected {count}")
            time.sleep(1)
        return nodes

    def job_status(self, submission_id: str) -> Optional[str]:
        """A submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); None if unknown."""
        status, body = self.get(f"/api/jobs/{submission_id}", self.token_file.read_text())
        return body["status"] if status == 200 and body else None

    def run(self, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a command (e.g. a driver: `resnet-batch embed -o compute.ray_address=...`) with this
        cluster's token, in its root folder."""
        return subprocess.run(list(cmd), env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout)

    def ray(self, *args: str, env: Optional[dict] = None, timeout: Optional[float] = 300, cwd=None,
            capture: bool = True) -> subprocess.CompletedProcess:
        """Run the `ray` CLI with this cluster's token (the Jobs API: `ray job submit --address
        self.dashboard ...`); with capture=False its output goes straight to this process's."""
        return subprocess.run([RAY, *args], env=env or self.env, cwd=cwd, capture_output=capture, text=True,
                              timeout=timeout)

    # -- the end ---------------------------------------------------------------------------------
    def processes(self, sessions: Optional[list[int]] = None) -> list[int]:
        """Every live process of this cluster's nodes (their `ray start` sessions), or of `sessions`."""
        sessions = self.sessions if sessions is None else sessions
        if not sessions:
            return []
        return [int(p) for p in os.listdir("/proc")
                if p.isdigit() and _session_of(int(p)) in sessions and not _zombie(int(p))]

    def _signal(self, sessions: list[int], grace_s: float = 8.0) -> None:
        """SIGTERM every process of these sessions, SIGKILL what is left after grace_s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.processes(sessions)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while pids and self.processes(sessions) and time.monotonic() < deadline:
                time.sleep(0.25)

    def stop(self, grace_s: float = 8.0, keep_logs: bool = False) -> None:
        """Stop every process of this cluster's sessions (SIGTERM, then SIGKILL after grace_s); then
        remove the nodes' temp dirs (unless keep_logs: Ray's logs are in them)."""
        self._signal(self.sessions, grace_s)
        if not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
