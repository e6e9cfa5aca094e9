"""lock module: one run at a time per output folder.

The lock is the file `_lock` in the output, created only if absent (locally O_CREAT|O_EXCL; on S3 a
conditional PutObject with `If-None-Match: *`), holding who took it. The holder refreshes it every
HEARTBEAT_S; a lock not refreshed for STALE_S, or whose holder was a process of this machine that no longer
exists (a killed run), is stale and taken over, saying so. Anything else refuses the second run, naming the
holder and when it was last seen.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from resnet_batch.errors import LockedError
from resnet_batch.retry import retrying
from resnet_batch.output.store import LOCK_FILE, OutputStore

HEARTBEAT_S = 30.0
STALE_S = 180.0


@dataclass
class Holder:
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    @classmethod
    def of(cls, data: dict) -> "Holder":
        return cls(str(data.get("host")), int(data.get("pid", -1)), str(data.get("token")),
                   float(data.get("started", 0)), float(data.get("heartbeat", 0)))

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (f"pid {self.pid} on {self.host}, running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, "
                f"last seen {age:.0f}s ago")


def alive_here(holder: Holder) -> bool:
    """Whether the holder is a live process of this machine (False for another machine: unknown here)."""
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Held for the whole run: `acquire()`, then `release()` (also on failure). Context manager."""

    def __init__(self, store: OutputStore, on_takeover: Callable[[str], None] = lambda msg: None):
        self.store = store
        self.holder = Holder(socket.gethostname(), os.getpid(), uuid.uuid4().hex, time.time(), time.time())
        self.on_takeover = on_takeover
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._etag: Optional[str] = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _body(self) -> bytes:
        self.holder.heartbeat = time.time()
        return json.dumps(self.holder.__dict__, sort_keys=True).encode()

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                break
            current = self.read()
            if current is None:
                continue  # released in between: try again
            stale = time.time() - current.heartbeat > STALE_S or not alive_here(current)
            if not stale:
                raise LockedError(
                    f"output {self.store.display()} is in use by another run ({current.describe()}); wait for it "
                    f"to finish. If that run is gone for sure, delete {self.store.display(LOCK_FILE)}.")
            self.on_takeover(f"taking over a stale lock on {self.store.display()} ({current.describe()})")
            self._remove_if(current)
        else:
            raise LockedError(f"could not take the lock on {self.store.display()}: another run keeps taking it")
        self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._thread.start()

    def read(self) -> Optional[Holder]:
        data = self.store.read_json(LOCK_FILE)
        return Holder.of(data) if data else None

    def _create(self) -> bool:
        """Create the lock file if it does not exist; True when this call created it."""
        path = self.store.path(LOCK_FILE)
        if self.store.is_local():
            os.makedirs(self.store.root, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        fs = self.store.fs
        bucket, key, _ = fs.split_path(path)
        try:
            out = retrying(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(),
                                              IfNoneMatch="*", **fs.req_kw), self.store.window, "taking the lock")
        except Exception as err:
            if _precondition_failed(err):
                return False
            raise
        self._etag = out.get("ETag")
        return True

    def _remove_if(self, holder: Holder) -> None:
        """Delete the lock if it is still the given holder's (a takeover)."""
        current = self.read()
        if current is not None and current.token == holder.token:
            self.store.remove(LOCK_FILE)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = self.read()
                if current is None or current.token != self.holder.token:
                    return  # taken over (we were stale): the other run owns it now
                self.store.write_bytes(LOCK_FILE, self._body())
            except Exception:
                continue  # the store is unreachable for a while: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = self.read()
            if current is not None and current.token == self.holder.token:
                self.store.remove(LOCK_FILE)
        except Exception:
            pass  # a lock left behind goes stale; the next run says so and takes it over


def _precondition_failed(err: BaseException) -> bool:
    for e in (err, err.__cause__, err.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
    return False
