"""cluster module, without a Ray runtime: how a command stops the local Ray it started."""
from types import SimpleNamespace

import ray._private.worker as ray_worker
from ray._private import ray_constants

from resnet_batch.cluster import _monitor_killed_at_once


class _Node:
    """Stands in for Ray's node object: records how each of its processes is asked to stop."""

    def __init__(self):
        self.calls = []

    def _kill_process_type(self, process_type, allow_graceful=False, check_alive=True, wait=False):
        self.calls.append((process_type, allow_graceful, check_alive, wait))


def test_the_monitor_is_killed_at_once_and_the_others_still_leave_gracefully(monkeypatch):
    node = _Node()
    monkeypatch.setattr(ray_worker, "_global_node", node)
    _monitor_killed_at_once()
    for process_type in (ray_constants.PROCESS_TYPE_RAYLET, ray_constants.PROCESS_TYPE_MONITOR,
                         ray_constants.PROCESS_TYPE_GCS_SERVER):
        node._kill_process_type(process_type, allow_graceful=True, check_alive=False, wait=False)
    assert node.calls == [(ray_constants.PROCESS_TYPE_RAYLET, True, False, False),
                          (ray_constants.PROCESS_TYPE_MONITOR, False, False, False),
                          (ray_constants.PROCESS_TYPE_GCS_SERVER, True, False, False)]


def test_without_a_local_ray_or_the_private_hook_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(ray_worker, "_global_node", None)
    _monitor_killed_at_once()  # a driver that joined a cluster: Ray has no node object here, and no error
    node = SimpleNamespace(name="a node of a Ray without _kill_process_type")
    monkeypatch.setattr(ray_worker, "_global_node", node)
    _monitor_killed_at_once()
    assert vars(node) == {"name": "a node of a Ray without _kill_process_type"}  # nothing patched onto it
