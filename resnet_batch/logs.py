"""logs module: the one voice of every command on stderr: the `resnet_batch` loggers, a line a person reads.

What a command says while it works (a stale lock taken over, an index's build steps, a service's reload) is a
log record of a logger under `resnet_batch`; a command's answer (the summary, the status, the matches) is
printed by the command itself. By default the lines are plain (INFO: the message; warnings and errors say
so) and details (DEBUG) stay hidden; --verbose shows those too, each with its time and logger; --quiet
leaves warnings and errors only.
"""
from __future__ import annotations

import logging
import sys

ROOT = "resnet_batch"


class _Plain(logging.Formatter):
    """`message`, `warning: message`, `error: message`: as the commands print their own errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            text = f"error: {text}"
        elif record.levelno >= logging.WARNING:
            text = f"warning: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Detailed(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class _Stderr(logging.StreamHandler):
    """sys.stderr as it is when a record is written (a test's capture, a redirected stream), not at set-up."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup(*, verbose: bool = False, quiet: bool = False) -> None:
    """Every `resnet_batch` logger to stderr: INFO and up by default, DEBUG with `verbose`, WARNING with `quiet`
    (called once by each command; calling it again replaces the earlier set-up)."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_Detailed() if verbose else _Plain())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False  # a host application's root handlers would print each line twice
