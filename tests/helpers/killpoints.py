"""Test driver: an embed run that dies at one named commit point, the way a kill -9 does (tests only).

Run through `Forks`: a process (`python -m tests.helpers.killpoints`) that has done the driver's imports once
and forks a driver for each spec, so torch, Ray, Arrow and the package are imported once per test session
instead of once per kill. The hooks live here, nowhere in the package: the driver
leaves with os._exit (no exception, no clean-up, no atexit), or a Ray task of the run SIGKILLs the driver
from outside once its own work is stored, so the task's result never reaches the driver. The run uses the
stand-in embedder through the Python API and the Ray cluster named in the spec.

Points of a sync (an existing output): `copy-task` (a copy task wrote its part, the driver dies before its
record), `drop-rewrite` (a drop task rewrote its first part), `drop-task` (a drop task finished), `ledger`
(the records of the copies and drops are stored, the manifest is not), `manifest` (the manifest is updated,
the plan still committed), `state` (the plan is uncommitted, not yet cleared), `success` (the report is
written, `_SUCCESS` is not). Of a first run: `first-manifest` (the first manifest piece is stored),
`first-record` (the first part is written, its record never logged), `first-ledger` (the first ledger
piece is stored), and `success`.
"""
from __future__ import annotations

import json
import os
import signal
import sys

EXIT = 137  # what a shell reports for a SIGKILLed process


def _die() -> None:
    sys.stderr.flush()
    os._exit(EXIT)


def _killing_task(name: str, driver: int, after_write: bool):
    """A stand-in for sync.<name> that runs the real one in the worker, then SIGKILLs the driver: after its
    first part write (after_write), else once the task's work is done."""

    def task(*args):
        import os
        import signal
        import time

        import resnet_batch.embed.sync as S

        def kill():
            try:
                os.kill(driver, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(600)  # the result must never arrive

        if after_write:
            real = S.write_file

            def write_then_kill(*a, **k):
                real(*a, **k)
                kill()

            S.write_file = write_then_kill
        out = getattr(S, name)(*args)
        kill()
        return out

    task.__name__ = name
    return task


def _die_after_first_flush(writer: type, pending: str) -> None:
    """writer.flush dies once it has stored something (its `pending` attribute was not empty)."""
    real_flush = writer.flush

    def flush(self):
        had = bool(getattr(self, pending))
        real_flush(self)
        if had:
            _die()

    writer.flush = flush


def install(point: str) -> None:
    """Arm the hook of `point` in this driver."""
    from resnet_batch.embed import sync, sync_run
    from resnet_batch.output import ledger, manifest, store

    driver = os.getpid()
    if point == "copy-task":
        sync._copy = _killing_task("_copy", driver, after_write=False)
    elif point == "drop-rewrite":
        sync._drop = _killing_task("_drop", driver, after_write=True)
    elif point == "drop-task":
        sync._drop = _killing_task("_drop", driver, after_write=False)
    elif point == "ledger":
        real_apply = sync.apply

        def apply(store_, part, fmt, root, protocol, entries, drops, copies, parts, records, on_record, flush):
            steps = [len(copies) > 0, len(drops) > 0]
            last = sum(steps)
            calls = []

            def flush_then_die():
                flush()
                calls.append(1)
                if len(calls) == last:
                    _die()

            return real_apply(store_, part, fmt, root, protocol, entries, drops, copies, parts, records, on_record,
                              flush_then_die)

        sync.apply = apply
    elif point == "manifest":
        real_write = sync.write_entries

        def write_entries(*a):
            real_write(*a)
            _die()

        sync.write_entries = write_entries
    elif point == "state":
        real_save = sync_run.save
        seen = []

        def save(store_, state):
            real_save(store_, state)
            if state.pending:
                seen.append(1)
            elif seen:
                _die()

        sync_run.save = save
    elif point == "success":
        real_write = store.OutputStore.write

        def write(self, name, content, **parquet):
            if name == store.SUCCESS_FILE:
                _die()
            return real_write(self, name, content, **parquet)

        store.OutputStore.write = write
    elif point == "first-manifest":
        _die_after_first_flush(manifest.ManifestWriter, "shards")
    elif point == "first-record":
        def add(self, record):
            _die()

        ledger.LedgerWriter.add = add
    elif point == "first-ledger":
        _die_after_first_flush(ledger.LedgerWriter, "buffer")
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def install_index(point: str) -> None:
    """Arm the hook of an `index` update's commit point: `staged` (the new generation staged, not moved),
    `generation` (the generation folder in place, index.json not switched), `switched` (index.json switched,
    unused files not removed), `cleaned` (unused files removed, the lock not released)."""
    from resnet_batch.search import folder

    if point == "staged":
        def publish_generation(self, meta, previous):
            _die()

        folder.Staging.publish_generation = publish_generation
    elif point == "generation":
        real_write = folder.write_file

        def write_file(fs, path, content, *a, **k):
            if path.endswith("/" + folder.META_FILE):
                _die()
            return real_write(fs, path, content, *a, **k)

        folder.write_file = write_file
    elif point in ("switched", "cleaned"):
        real_remove = folder.remove_unused

        def remove_unused(*a, **k):
            if point == "cleaned":
                real_remove(*a, **k)
            _die()

        folder.remove_unused = remove_unused
    else:
        raise SystemExit(f"unknown index kill point {point!r}")


def main(spec: dict) -> None:
    if spec.get("index"):  # an `index` update over spec["embeddings"] into spec["index"]
        from resnet_batch.cli import main as cli

        install_index(spec["point"])
        options = ["--storage-options", json.dumps(spec["storage_options"])] if spec.get("storage_options") else []
        cli(["index", "--embeddings", spec["embeddings"], "--out", spec["index"], *options])
        print("the update ended without reaching its kill point", file=sys.stderr, flush=True)
        os._exit(3)
    import ray

    from resnet_batch.embed.runner import run
    from tests.helpers.jobs import job_config
    from tests.helpers.standin import StandInEmbedder

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ray.init(address=spec["ray"], log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": spec["pythonpath"]}})
    opts = spec.get("storage_options") or {}
    cfg = job_config(spec["input"], spec["output"], spec["checkpoint"],
                     input={"images_per_shard": spec["per_shard"], "storage_options": opts},
                     output={"storage_options": opts})
    install(spec["point"])
    run(cfg, embedder=StandInEmbedder)
    print("the run ended without reaching its kill point", file=sys.stderr, flush=True)
    os._exit(3)


PRELOAD = ("ray", "torch", "pyarrow.parquet", "resnet_batch.embed.runner", "resnet_batch.embed.sync",
           "resnet_batch.cli", "resnet_batch.search.cli", "resnet_batch.search.folder", "tests.helpers.jobs",
           "tests.helpers.standin")


def serve_forks() -> None:
    """The fork server: imports what a driver imports (nothing started: no Ray, no thread pool, no CUDA),
    then for each spec line on stdin forks a driver whose stdout and stderr go to the spec's log file, waits
    for it (SIGKILLing it after the spec's timeout) and answers its exit status as a JSON line."""
    import importlib
    import time

    for name in PRELOAD:
        importlib.import_module(name)
    print("ready", flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the driver
            fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.environ.clear()  # the test's environment at the time of the call, as a subprocess would get it
            os.environ.update(spec["env"])
            try:
                main(spec)
            except BaseException:  # noqa: BLE001 (reported in the log, a distinct exit status)
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(4)
        deadline = time.time() + spec.get("timeout", 600)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)


class Forks:
    """A client of the fork server (one per test session and worker): `run(spec)` -> (exit status, log)."""

    def __init__(self, repo, workdir):
        import subprocess

        self.workdir = workdir
        self.n = 0
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.killpoints"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo,
                                     env={**os.environ, "PYTHONPATH": str(repo)})
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the kill-point fork server did not start")

    def run(self, spec: dict, timeout: float = 600) -> tuple[int, str]:
        self.n += 1
        log = os.path.join(self.workdir, f"driver-{self.n}.log")
        self.proc.stdin.write(json.dumps({**spec, "log": log, "timeout": timeout, "env": dict(os.environ)}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the kill-point fork server died")
        with open(log) as f:
            return json.loads(answer)["returncode"], f.read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve_forks()
