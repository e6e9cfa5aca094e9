"""Test helper: crash a driver the way a kill -9 does, then clean up what it leaves."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver first (the crash), then every process it had started (its Ray: GCS, raylet, the
    workers and actors under them), and wait until they are all gone, so nothing of the killed run can still
    write once this returns. The driver must have been started with start_new_session=True."""
    tree = descendants(proc.pid)  # before the kill: an orphan's parent is no longer the driver
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while any(_alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.1)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
