"""lock module: one writer per output folder, for sure.

The lock is the file `_lock` in the output, holding who took it (a random token, the host, the process, and
what tells processes of this host apart: the boot, the pid namespace and the process start time). Every
change to it is a conditional replace, so of two runs that race for it exactly one wins:

- create: only if absent (locally a hard link of a complete temporary file, which fails when the name
  exists; on S3 a PutObject with `If-None-Match: *`);
- take over a stale lock, refresh it (the heartbeat), release it: only if it is still the version that was
  read (locally under `flock` of that very file, checked to still be the one at the name, then an atomic
  rename over it; on S3 a PutObject or DeleteObject with `If-Match` on the ETag that was read).

The holder refreshes it every HEARTBEAT_S. A lock not refreshed for STALE_S, or whose holder was a process
of this boot and pid namespace that no longer exists, is stale: the next run takes it over, saying so.
A holder that finds the lock is no longer its own (taken over while it was paused, or its heartbeat could
not be stored for LOST_S, after which others may judge it stale) has lost it: `ensure()` (called by the
output store before every write of the run's bookkeeping) then raises LockLost, the run stops handing out
work and exits 1 naming what happened.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from resnet_batch.errors import LockedError, RunFailed
from resnet_batch.retry import retrying
from resnet_batch.output.store import LOCK_FILE, OutputStore

HEARTBEAT_S = 30.0
STALE_S = 180.0
LOST_S = STALE_S - 2 * HEARTBEAT_S  # a holder whose heartbeat failed this long stops writing (others may soon take over)
ATTEMPTS = 5


class LockLost(RunFailed):
    """This run's lock was taken over (or could not be kept): it stops writing; the other run owns the output."""


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> Optional[int]:
    """A process's start time (clock ticks after boot; /proc/PID/stat field 22), None when it is gone."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass
class Holder:
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float
    boot: str = ""  # /proc/sys/kernel/random/boot_id: a reboot ends every holder of the host
    pidns: int = 0  # the pid namespace: containers sharing a host name have their own pids
    start_ticks: int = -1  # the process's start time: a pid used again is another process

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now,
                   _read_text("/proc/sys/kernel/random/boot_id"), _pid_namespace(),
                   _start_ticks(os.getpid()) or -1)

    @classmethod
    def of(cls, data: dict) -> "Holder":
        def num(key, kind, default):
            try:
                return kind(data.get(key, default))
            except (TypeError, ValueError):
                return default

        return cls(str(data.get("host")), num("pid", int, -1), str(data.get("token")), num("started", float, 0.0),
                   num("heartbeat", float, 0.0), str(data.get("boot") or ""), num("pidns", int, 0),
                   num("start_ticks", int, -1))

    def describe(self) -> str:
        from resnet_batch.text import printable

        age = time.time() - self.heartbeat
        return (f"pid {self.pid} on {printable(self.host)}, running since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, last seen {age:.0f}s ago")


def alive_here(holder: Holder) -> bool:
    """False only when the holder is surely gone: a process of this very boot and pid namespace whose pid is
    free or now another process. A holder elsewhere (another machine, another container sharing this host
    name, an older lock without these fields) cannot be judged from here: True (its heartbeat decides)."""
    me = Holder.me()
    if holder.host != me.host or not holder.boot or holder.boot != me.boot or holder.pidns != me.pidns:
        return True
    ticks = _start_ticks(holder.pid)
    if ticks is None:
        return False
    return holder.start_ticks < 0 or ticks == holder.start_ticks


def is_stale(holder: Holder) -> bool:
    return time.time() - holder.heartbeat > STALE_S or not alive_here(holder)


class OutputLock:
    """Held for the whole run: `acquire()`, then `release()` (also on failure). Context manager. While held,
    the store calls `ensure()` before each bookkeeping write."""

    def __init__(self, store: OutputStore, on_takeover: Callable[[str], None] = lambda msg: None,
                 on_lost: Callable[[str], None] = lambda msg: None):
        self.store = store
        self.holder = Holder.me()
        self.on_takeover, self.on_lost = on_takeover, on_lost
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._version: Optional[str] = None  # what our last write left there (S3: its ETag)
        self._beat_ok = time.monotonic()  # when our last heartbeat was stored
        self.lost: Optional[str] = None  # why the lock is no longer ours
        self._made_root = False
        self._mutex = threading.Lock()  # the heartbeat and ensure() do not write at once

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _body(self) -> bytes:
        self.holder.heartbeat = time.time()
        return json.dumps(asdict(self.holder), sort_keys=True).encode()

    # -- taking it -------------------------------------------------------------------------------
    def acquire(self) -> None:
        for _ in range(ATTEMPTS):
            if self._create():
                break
            current, version = self._read()
            if current is None:
                continue  # released in between: try again
            if current.token == self.holder.token:  # our create went through, its answer was lost
                self._version = version
                break
            if not is_stale(current):
                raise LockedError(
                    f"output {self.store.display()} is in use by another run ({current.describe()}); wait for it "
                    f"to finish. If that run is gone for sure, delete {self.store.display(LOCK_FILE)}.")
            self.on_takeover(f"taking over a stale lock on {self.store.display()} ({current.describe()})")
            if self._replace(version, current.token):
                break
            # another run replaced or released it first: read it again (it is probably fresh now)
        else:
            raise LockedError(f"could not take the lock on {self.store.display()}: another run keeps taking it")
        mine, _ = self._read()
        if mine is None or mine.token != self.holder.token:  # never expected: the replace was conditional
            raise LockedError(f"the lock on {self.store.display()} was taken by another run as this one took it")
        self._beat_ok = time.monotonic()
        self.store.guard = self.ensure
        self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._thread.start()

    def read(self) -> Optional[Holder]:
        return self._read()[0]

    def _read(self) -> tuple[Optional[Holder], Optional[str]]:
        """The holder and the version read (S3: the ETag; locally the inode), None when there is no lock."""
        path = self.store.path(LOCK_FILE)
        if self.store.is_local():
            try:
                with open(path, "rb") as f:
                    data, version = f.read(), str(os.fstat(f.fileno()).st_ino)
            except FileNotFoundError:
                return None, None
        else:
            fs = self.store.fs
            bucket, key, _ = fs.split_path(path)

            def get():
                try:
                    out = fs.call_s3("get_object", Bucket=bucket, Key=key, **fs.req_kw)
                except FileNotFoundError:
                    return None, None
                return _sync_read(fs, out["Body"]), out.get("ETag")

            data, version = retrying(get, self.store.window, "reading the lock")
            if data is None:
                return None, None
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):  # damaged (not ours): judged by its age alone, as a holder long gone
            parsed = {"token": "", "heartbeat": 0, "host": "?"}
        return Holder.of(parsed), version

    def _create(self) -> bool:
        """Create the lock if it does not exist; True when this call created it."""
        path = self.store.path(LOCK_FILE)
        body = self._body()
        if self.store.is_local():
            if not os.path.isdir(self.store.root):
                os.makedirs(self.store.root, exist_ok=True)
                self._made_root = True  # removed again on release if nothing else was written there
            tmp = self._temp(body)
            try:
                os.link(tmp, path)  # fails when the name exists; readers never see a partial lock
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            self._version = str(os.stat(path).st_ino)
            return True
        try:
            self._version = self._put(body, IfNoneMatch="*")
        except _Precondition:
            return False
        return True

    def _replace(self, version: Optional[str], token: str, body: Optional[bytes] = None) -> bool:
        """Put our holder in place of the lock version `version` (holding `token`); False when it has changed
        since (another run got there first). With body=b"" the lock is deleted instead (a release)."""
        body = self._body() if body is None else body
        path = self.store.path(LOCK_FILE)
        if self.store.is_local():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # every replace of this file is serialised here
                try:
                    if str(os.stat(path).st_ino) != str(os.fstat(fd).st_ino) or str(os.fstat(fd).st_ino) != version:
                        return False  # replaced since it was read
                except FileNotFoundError:
                    return False
                with os.fdopen(os.dup(fd), "rb") as f:
                    f.seek(0)
                    try:
                        if json.loads(f.read()).get("token") != token:
                            return False
                    except (ValueError, AttributeError):
                        if token:
                            return False
                if body == b"":
                    os.unlink(path)
                    return True
                tmp = self._temp(body)
                os.rename(tmp, path)  # atomic; waiters holding the old file see it is no longer at the name
                self._version = str(os.stat(path).st_ino)
                return True
            finally:
                os.close(fd)
        try:
            if body == b"":
                self._s3("delete_object", IfMatch=version)
            else:
                self._version = self._put(body, IfMatch=version)
        except _Precondition:
            return False
        except FileNotFoundError:
            return False
        return True

    def _temp(self, body: bytes) -> str:
        tmp = self.store.path(f".{LOCK_FILE}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _put(self, body: bytes, **cond) -> Optional[str]:
        return self._s3("put_object", Body=body, **cond).get("ETag")

    def _s3(self, op: str, **kw) -> dict:
        fs = self.store.fs
        bucket, key, _ = fs.split_path(self.store.path(LOCK_FILE))

        def call():
            try:
                return fs.call_s3(op, Bucket=bucket, Key=key, **kw, **fs.req_kw)
            except Exception as err:
                if _precondition_failed(err):
                    raise _Precondition() from None
                raise
        return retrying(call, self.store.window, "writing the lock")

    # -- keeping it ------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.beat():
                return

    def beat(self) -> bool:
        """Refresh the lock (conditional on it being our last version); False once it is lost."""
        with self._mutex:
            if self.lost:
                return False
            try:
                ok = self._replace(self._version, self.holder.token)
            except Exception as err:  # the store is unreachable for a while: the next beat tries again
                if time.monotonic() - self._beat_ok > LOST_S:
                    self._lose(f"its heartbeat could not be stored for {LOST_S:.0f}s ({type(err).__name__}); "
                               "another run may take the output over")
                    return False
                return True
            if not ok:
                current, version = self._read()
                if current is not None and current.token == self.holder.token:  # ours: an answer was lost
                    self._version, self._beat_ok = version, time.monotonic()
                    return True
                who = f" by {current.describe()}" if current is not None else " (the lock file is gone)"
                self._lose(f"the lock was taken over{who}")
                return False
            self._beat_ok = time.monotonic()
            return True

    def _lose(self, why: str) -> None:
        self.lost = (f"this run lost the lock on {self.store.display()}: {why}. It stopped writing; what it "
                     "finished is kept, and a rerun resumes once the other run is over")
        self.on_lost(self.lost)

    def check(self) -> None:
        """Raise LockLost if the heartbeat found the lock lost (no I/O: for the driver's loop)."""
        if self.lost is not None:
            raise LockLost(self.lost)

    def ensure(self) -> None:
        """Raise LockLost unless the lock is still this run's (called before every bookkeeping write)."""
        if self.lost is None:
            if time.monotonic() - self._beat_ok > LOST_S:
                self.beat()
            if self.lost is None:
                current, version = self._read()
                if current is None or current.token != self.holder.token:
                    who = f" by {current.describe()}" if current is not None else " (the lock file is gone)"
                    self._lose(f"the lock was taken over{who}")
        if self.lost is not None:
            raise LockLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if getattr(self.store, "guard", None) == self.ensure:
            self.store.guard = None
        if self.lost:
            return  # not ours: leave it to its holder
        try:
            current, version = self._read()
            if current is not None and current.token == self.holder.token:
                self._replace(version, self.holder.token, body=b"")
            if self._made_root:
                os.rmdir(self.store.root)  # fails (and stays) unless the run left nothing there
        except Exception:
            pass  # a lock left behind goes stale; the next run says so and takes it over


class _Precondition(Exception):
    """A conditional write whose condition did not hold."""


def _sync_read(fs, body) -> bytes:
    """The bytes of an aiobotocore streaming body, read on s3fs's loop."""
    from fsspec.asyn import sync

    async def read():
        return await body.read()

    return sync(fs.loop, read)


def _precondition_failed(err: BaseException) -> bool:
    seen = 0
    e: Optional[BaseException] = err
    while e is not None and seen < 5:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        if "pre-conditions you specified did not hold" in str(e) or "PreconditionFailed" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
