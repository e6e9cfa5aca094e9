"""Test helper: crash a driver the way a kill -9 does, then clean up what it leaves."""
from __future__ import annotations

import os
import signal
import subprocess
import time


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver first (the crash), then whatever Ray processes it left in its session
    (the driver must have been started with start_new_session=True)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
