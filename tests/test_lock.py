"""One writer per output, for sure: lock takeovers race (locally and on the S3 server the tests start), a
heartbeat that cannot be stored, a paused holder that wakes after being taken over, a real run whose lock
is taken: at no point do two runs both write, and a run that lost its lock exits 1 saying so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from resnet_batch.errors import LockedError
from resnet_batch.output import lock as lockmod
from resnet_batch.output.lock import Holder, LockLost, OutputLock, alive_here
from resnet_batch.output.store import LOCK_FILE, OutputStore
from tests.helpers.jobs import REPO


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request, tmp_path):
    """An output location: a local folder, or a folder in a bucket of the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    server = request.getfixturevalue("s3_server")
    name = f"lock-{abs(hash(request.node.name)) % 10**8}"
    server.make_bucket(name)
    return f"s3://{name}/out", server.storage_options()


@pytest.fixture
def quick(monkeypatch):
    """Heartbeats every 0.2 s, stale after 3 s, a holder that could not beat for 1.5 s gives up."""
    monkeypatch.setattr(lockmod, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(lockmod, "STALE_S", 3.0)
    monkeypatch.setattr(lockmod, "LOST_S", 1.5)


def _store(where) -> OutputStore:
    uri, opts = where
    return OutputStore(uri, opts, retry_window_s=5.0)


def _plant(store: OutputStore, **fields) -> None:
    """A lock of another run (stale unless fields say otherwise)."""
    body = {"host": "elsewhere", "pid": 1, "token": "old", "started": 0, "heartbeat": 0, **fields}
    store.write(LOCK_FILE, json.dumps(body).encode())


class Timeline:
    """Every successful bookkeeping write, by whom and when (monotonic), for the no-overlap check."""

    def __init__(self):
        self.events: list[tuple[float, float, str]] = []
        self.mutex = threading.Lock()

    def write(self, store: OutputStore, who: str) -> bool:
        t0 = time.monotonic()
        try:
            store.write(f"_written-by-{who}", who.encode())
        except LockLost:
            return False
        with self.mutex:
            self.events.append((t0, time.monotonic(), who))
        return True

    def assert_one_writer_at_a_time(self, first: str, second: str) -> None:
        a = [e for e in self.events if e[2] == first]
        b = [e for e in self.events if e[2] == second]
        assert a and b, self.events
        assert max(end for _, end, _ in a) <= min(start for start, _, _ in b), \
            f"{first} still wrote after {second} had begun writing"


def test_two_takeovers_racing_for_a_stale_lock_one_wins(where, monkeypatch):
    """Both runs read the same stale lock, then both try to replace it at the same moment: exactly one
    gets it, the other is refused naming the winner; repeated to give the race every chance."""
    real = OutputLock._replace
    for trial in range(4):
        store = _store(where)
        _plant(store)
        barrier = threading.Barrier(2, timeout=30)
        raced: set[int] = set()

        def replace(self, version, token, body=None):
            if id(self) not in raced:  # the takeover: both wait until the other has read the stale lock too
                raced.add(id(self))
                barrier.wait()
            return real(self, version, token, body)

        monkeypatch.setattr(OutputLock, "_replace", replace)
        locks = [OutputLock(_store(where)), OutputLock(_store(where))]
        outcome: dict[int, object] = {}

        def take(i):
            try:
                locks[i].acquire()
                outcome[i] = "held"
            except LockedError as err:
                outcome[i] = err

        threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        monkeypatch.setattr(OutputLock, "_replace", real)
        held = [i for i in range(2) if outcome.get(i) == "held"]
        assert len(held) == 1, (trial, outcome)
        loser = outcome[1 - held[0]]
        assert "in use by another run" in str(loser), loser
        assert store.read_json(LOCK_FILE)["token"] == locks[held[0]].holder.token
        locks[held[0]].ensure()
        with pytest.raises(LockLost):  # the loser never held it; had it thought so, this says no
            locks[1 - held[0]].lost = None
            locks[1 - held[0]]._beat_ok = time.monotonic()
            locks[1 - held[0]].ensure()
        locks[held[0]].release()
        assert store.read_json(LOCK_FILE) is None


def test_a_holder_whose_heartbeat_cannot_be_stored_stops_writing_before_it_can_be_taken_over(where, quick):
    timeline = Timeline()
    a = OutputLock(_store(where))
    a.acquire()
    assert timeline.write(a.store, "A")

    def unreachable(*args, **kwargs):
        raise TimeoutError("the store does not answer")

    a._replace = unreachable  # every heartbeat fails from now on
    b = OutputLock(_store(where))
    b_held = threading.Event()

    def keep_writing(lock, who, stop):
        while not stop.is_set():
            if not timeline.write(lock.store, who):
                return
            time.sleep(0.02)

    stop = threading.Event()
    writer_a = threading.Thread(target=keep_writing, args=(a, "A", stop))
    writer_a.start()
    deadline = time.monotonic() + 30
    while not b_held.is_set():
        try:
            b.acquire()
            b_held.set()
        except LockedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    writer_a.join(10)
    assert not writer_a.is_alive(), "A kept writing"
    assert timeline.write(b.store, "B")
    timeline.assert_one_writer_at_a_time("A", "B")
    assert "heartbeat could not be stored" in (a.lost or "")
    with pytest.raises(LockLost, match="lost the lock"):
        a.ensure()
    stop.set()
    a.release()  # leaves B's lock alone
    b.ensure()
    b.release()


def test_a_paused_holder_that_wakes_after_a_takeover_writes_nothing(where, quick):
    timeline = Timeline()
    a = OutputLock(_store(where))
    a.acquire()
    assert timeline.write(a.store, "A")
    awake = threading.Event()
    real_beat = a.beat

    def paused_beat():
        awake.wait()  # the whole process is paused (SIGSTOP, a long GC, a VM migration)
        return real_beat()

    a.beat = paused_beat
    b = OutputLock(_store(where))
    deadline = time.monotonic() + 30
    while True:
        try:
            b.acquire()
            break
        except LockedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert timeline.write(b.store, "B")
    a._beat_ok = time.monotonic()  # as if no time had passed for the paused process
    awake.set()
    assert not timeline.write(a.store, "A"), "the holder that was taken over wrote again"
    assert "taken over" in a.lost
    assert timeline.write(b.store, "B")
    timeline.assert_one_writer_at_a_time("A", "B")
    a.release()
    assert _store(where).read_json(LOCK_FILE)["token"] == b.holder.token  # A's release leaves B's lock
    b.release()


def test_a_fresh_lock_of_a_live_holder_is_refused(where):
    store = _store(where)
    _plant(store, heartbeat=time.time(), token="live")
    with pytest.raises(LockedError, match="in use by another run"):
        OutputLock(_store(where)).acquire()
    assert store.read_json(LOCK_FILE)["token"] == "live"


def test_a_holder_is_judged_dead_only_in_its_own_boot_and_pid_namespace():
    me = Holder.me()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    same = Holder(me.host, dead.pid, "t", 0, time.time(), me.boot, me.pidns, 1)
    assert not alive_here(same)  # a process of this boot and namespace that is gone
    other_ns = Holder(me.host, dead.pid, "t", 0, time.time(), me.boot, me.pidns + 1, 1)
    assert alive_here(other_ns)  # a container sharing the host name: cannot be judged from here
    reused = Holder(me.host, os.getpid(), "t", 0, time.time(), me.boot, me.pidns, me.start_ticks + 1)
    assert not alive_here(reused)  # this pid is another process now
    assert alive_here(Holder(me.host, os.getpid(), "t", 0, time.time(), me.boot, me.pidns, me.start_ticks))
    older = Holder(me.host, dead.pid, "t", 0, time.time())  # a lock without these fields
    assert alive_here(older)


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_whose_lock_is_taken_over_stops_and_exits_1(tmp_path, checkpoint, ray_address):
    from resnet_batch.dev.sample_data import make_sample_photos

    make_sample_photos(tmp_path / "photos", 40, per_folder=20, seed=9)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "resnet_batch.cli", "embed", "--quiet", "--input", str(tmp_path / "photos"),
           "--output", str(out), "-o", f"model.weights={checkpoint}", "-o", "model.precision=fp32",
           "-o", "input.images_per_shard=4", "-o", "compute.batch_size=4", "-o", "compute.decode_batch_size=4",
           "-o", "compute.torch_threads=1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO), **ray_address},  # the session's Ray
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("part-*.parquet")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    other = {"host": "another-machine", "pid": 4242, "token": "theirs", "started": time.time(),
             "heartbeat": time.time()}
    tmp = out / ".taken"
    tmp.write_text(json.dumps(other))
    os.rename(tmp, out / LOCK_FILE)  # another run took the output over
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, log
    assert "lost the lock" in log and "another-machine" in log, log
    assert not (out / "_SUCCESS").exists()
    assert json.loads((out / LOCK_FILE).read_text())["token"] == "theirs"  # its lock was left alone
