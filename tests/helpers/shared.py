"""shared module: a file or folder made once per test run and shared by every pytest-xdist worker.

Each worker is its own process with its own session fixtures; what is expensive and read-only (the test photos,
the seeded checkpoint, the real embed job's output over them) is made by whichever worker asks first, under a file
lock, in the run's common temp folder, and the others wait for it and read it. The same paths matter as much as
the time: an output records each photo's absolute path and the checkpoint's path, so workers sharing an output
must share those too.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable

DONE = ".made"


def run_root(tmp_path_factory) -> Path:
    """The temp folder of this pytest run: shared by its xdist workers (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_path(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """`run_root/name`, made by `make(path)` once per run: the first worker to get here makes it (a half-made one,
    left by a worker that died, is made again), the others wait on the lock and return it as it is."""
    root = run_root(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}{DONE}"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                make(path)
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
