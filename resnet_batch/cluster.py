"""cluster module: Ray start-up and shutdown, shared by the embed job, the search jobs and jobs/."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional


def init_ray(address: Optional[str], verbose: bool = False, ray_data: bool = True) -> None:
    """Connect to the given cluster (else RAY_ADDRESS), or start a local Ray; no-op when already connected.
    Ray's own INFO/WARNING lines stay in its log folder unless `verbose`. `ray_data=False` leaves Ray Data's
    import (0.8 s of CPU) and its quieting to the caller (quiet_ray_data), for when something is more urgent."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(include_dashboard=False, **quiet)
    if ray_data:
        quiet_ray_data(verbose)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data logs every execution at INFO on the console; keep that in its log file (the session's
    logs folder) and show only errors, unless `verbose`."""
    import ray.data  # noqa: F401 (configures the "ray.data" logger)
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.INFO if verbose else logging.ERROR)


def ray_logs_dir() -> Optional[str]:
    """Where this Ray session keeps its logs (on the head node for a cluster)."""
    try:
        import ray

        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except Exception:
        return None


def wants_gpu(device: str, cluster_gpus: float) -> bool:
    """Whether the model actors ask Ray for GPUs (compute.device; `auto` looks at the cluster now)."""
    return device == "cuda" or (device == "auto" and cluster_gpus > 0)


def worker_uri(uri: str) -> str:
    """A URI as Ray workers must get it: a local path made absolute, since a worker runs in its raylet's
    folder, not the driver's (a driver joining a Ray started elsewhere would write `out/...` there)."""
    from fsspec.core import split_protocol

    protocol, path = split_protocol(uri)
    if (protocol or "file") not in ("file", "local"):
        return uri
    return os.path.abspath(os.path.expanduser(path))


def ray_connected() -> bool:
    """Whether this process is connected to Ray (without importing it)."""
    ray = sys.modules.get("ray")  # commands that never touched Ray do not import it here
    return ray is not None and ray.is_initialized()


def stop_ray() -> None:
    """Leave Ray (and stop the local one a command started) while the interpreter is whole: left to Ray's exit
    hooks, its processes can be killed before the driver has flushed to them, and the exit then waits ~25 s."""
    if ray_connected():
        _monitor_killed_at_once()
        sys.modules["ray"].shutdown()


def _monitor_killed_at_once() -> None:
    """Ray stops the processes of the local Ray it started one at a time, each given a second to leave after
    SIGTERM; its autoscaler monitor never leaves on SIGTERM, so every command that started its own Ray waited
    that second for nothing. The monitor holds nothing to save: it gets SIGKILL at once."""
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    stop = getattr(node, "_kill_process_type", None)
    if stop is None:
        return

    def quick(process_type, **kwargs):
        if process_type == ray_constants.PROCESS_TYPE_MONITOR:
            kwargs["allow_graceful"] = False
        return stop(process_type, **kwargs)

    node._kill_process_type = quick
