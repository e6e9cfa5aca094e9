"""errors module: the one error vocabulary of every command, and the exit codes beside it.

`UserError` and its subclasses are what a user can cause and fix (a config key, an input, an output
location, weights, mixed provenance, an index): the commands print the message in one line and exit
with EXIT_USAGE (2), and they are raised only *before* any work is done. A run that started and then
could not finish everything raises `RunFailed` (EXIT_FAILED, 1): what finished is kept and a rerun
resumes. Broad built-ins (ValueError, KeyError, OSError) are never mapped to "your input is wrong".
"""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """Something the user can fix, refused before any work; the message says what and how."""


class ConfigError(UserError):
    """The run configuration (YAML, -o overrides, command-line flags) is invalid."""


class InputError(UserError):
    """The input cannot be listed or holds nothing to embed."""


class OutputError(UserError):
    """The output location cannot be used as asked."""


class WeightsError(UserError):
    """The configured weights cannot be had, or are not what they claim to be."""


class ProvenanceMismatch(UserError):
    """Two sets of embeddings come from different models, weights, preprocessing or precision."""


class SimilarityIndexError(UserError):
    """Embeddings or an index folder cannot be used as asked."""


class LockedError(UserError):
    """Another run holds the output."""


class RunFailed(Exception):
    """A run that started could not finish everything; finished work is kept, a rerun resumes."""


def one_line(err: BaseException) -> str:
    """An error in one line. For a Ray error that carries a worker's exception (a task's, or an actor's
    constructor's), that exception: "RuntimeError: compute.device=cuda: ..." rather than Ray's wrapper."""
    import re

    cause = err
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    inner = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exhausted|Failed)\b: ", line)]
    if inner:
        return inner[-1]
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def honour_interrupts() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in this process, whatever it inherited. A process started in
    the background by a non-interactive shell (`make test &`, cron, nohup) inherits SIGINT *ignored*, and
    Python then leaves it ignored: an interrupt at any moment (a job being submitted, say) was lost and the run
    went on to exit 0. Commands that promise 130 on an interrupt call this first (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_on_terminate() -> None:
    """SIGTERM (what `kill`, systemd and Kubernetes send to stop a service) raises KeyboardInterrupt, as Ctrl-C
    does, so the service shuts down in order and exits with its promised code instead of dying by the signal."""
    import signal
    import threading

    def terminate(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
