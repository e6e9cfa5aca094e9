"""raycluster module: the package's local Ray cluster (resnet_batch.dev.localcluster) with what only tests need.

`LoopbackCluster` is a `LocalCluster` (real nodes on 127.0.0.1, own ports and temp dirs, token auth with
a private token file, stopped by session) that can also run Ray's autoscaler and kill a node:

With `start_head(..., autoscaling=node_types)` the head runs Ray's autoscaler with its `fake_multinode`
provider: worker nodes of the given types (logical GPUs included) are started and stopped on this
machine by the autoscaler itself, as cloud VMs would be. `kill_node` takes a node away as a spot
machine's loss would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

from resnet_batch.dev.localcluster import BIN, RAY, LocalCluster, free_ports  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[2]


class LoopbackCluster(LocalCluster):
    """A LocalCluster with an optional autoscaling head and node kills; the `ray` CLI runs in the repo."""

    def start_head(self, num_cpus: float, resources: Optional[dict] = None, autoscaling: Optional[dict] = None) -> None:
        """The head; with `autoscaling` (worker node types as in a cluster launcher config) it also
        runs the autoscaler, which starts and stops worker nodes of those types on this machine."""
        if not autoscaling:
            return super().start_head(num_cpus, resources)
        def args() -> list[str]:  # fresh ports, and a config naming them, for each attempt
            head = self._head_args()
            config = self.root / "autoscaling.json"
            config.write_text(json.dumps(_fake_autoscaling_config(self.gcs_port, num_cpus, resources or {},
                                                                  autoscaling)))
            return [*head, f"--autoscaling-config={config}"]
        self._start(args, num_cpus, resources or {}, {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})

    def ray(self, *args: str, env: Optional[dict] = None, timeout: Optional[float] = 300, cwd=REPO,
            capture: bool = True) -> subprocess.CompletedProcess:
        return super().ray(*args, env=env, timeout=timeout, cwd=cwd, capture=capture)

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


def _fake_autoscaling_config(gcs_port: int, head_cpus: float, head_resources: dict, node_types: dict) -> dict:
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
