"""A node that a loaded machine keeps from registering in time is stopped and started again.

Ray gives a new node a fixed 30 s to register with its GCS; under load that can pass (CI saw it). These
tests put a stand-in `ray` script in place of the CLI (no Ray starts): it leaves a daemon behind in its
session, as a half-started node does, and fails as `ray start` does, a given number of times."""
from __future__ import annotations

import re
import stat

import pytest

from resnet_batch.dev import localcluster
from resnet_batch.dev.localcluster import LocalCluster

TIMED_OUT = "Exception: The current node timed out during startup. This could happen because ..."


def _stand_in_ray(tmp_path, monkeypatch, failures: int, message: str = TIMED_OUT):
    """A `ray` that records its arguments, leaves a `sleep` in its session, and fails `failures` times."""
    script = tmp_path / "ray"
    script.write_text(f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
sleep 300 >/dev/null 2>&1 &
echo $! >> {tmp_path}/daemons
if [ $(wc -l < {tmp_path}/calls) -le {failures} ]; then echo "{message}"; exit 1; fi
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(localcluster, "RAY", str(script))
    return lambda name: (tmp_path / name).read_text().split("\n")[:-1] if (tmp_path / name).exists() else []


def _cluster(tmp_path) -> LocalCluster:
    (tmp_path / "c").mkdir()
    return LocalCluster(tmp_path / "c")


def _alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_head_that_timed_out_twice_is_started_a_third_time_on_fresh_ports(tmp_path, monkeypatch):
    read = _stand_in_ray(tmp_path, monkeypatch, failures=2)
    cluster = _cluster(tmp_path)
    try:
        cluster.start_head(num_cpus=1)
        calls, daemons = read("calls"), read("daemons")
        assert len(calls) == 3 and all(c.startswith("start --head --port ") for c in calls)
        gcs_ports = [re.search(r"--port (\d+)", c).group(1) for c in calls]
        assert len(set(gcs_ports)) == 3 and cluster.address == f"127.0.0.1:{gcs_ports[-1]}"
        temp_dirs = [re.search(r"--temp-dir (\S+)", c).group(1) for c in calls]
        assert len(set(temp_dirs)) == 3  # a retry does not start in the failed node's leftovers
        assert [_alive(p) for p in daemons] == [False, False, True]  # the failed starts' daemons are stopped
    finally:
        cluster.stop()
    assert not _alive(daemons[-1])


def test_a_node_that_keeps_timing_out_fails_after_three_attempts(tmp_path, monkeypatch):
    read = _stand_in_ray(tmp_path, monkeypatch, failures=99)
    cluster = _cluster(tmp_path)
    with pytest.raises(RuntimeError, match=r"`ray start --address 127\.0\.0\.1:0` failed \(1\) \(attempt 3 of 3\)"
                                           r":\n.*timed out during startup"):
        cluster.add_node(num_cpus=1)
    assert len(read("calls")) == 3
    assert not any(_alive(p) for p in read("daemons"))
    assert cluster.processes() == []


def test_any_other_start_failure_is_not_retried(tmp_path, monkeypatch):
    read = _stand_in_ray(tmp_path, monkeypatch, failures=99, message="Error: No such option: --bogus")
    cluster = _cluster(tmp_path)
    with pytest.raises(RuntimeError, match=r"failed \(1\):\nError: No such option: --bogus"):
        cluster.start_head(num_cpus=1)
    assert len(read("calls")) == 1
    assert not _alive(read("daemons")[0])
