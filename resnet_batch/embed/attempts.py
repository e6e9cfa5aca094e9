"""attempts module: the scheduler's book of shard tries: which results count (not a late one from an earlier
try), when a shard is done, and which unfinished shards go round again or fail for good. No Ray in here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from resnet_batch.embed.listing import Shard

LOST = "no result came back (its read task or model actor was lost)"


@dataclass
class Failure:
    """A shard that failed every attempt."""

    shard: Shard
    attempts: int
    reason: str


@dataclass
class _Window:
    shards: set
    reading: bool = True
    outstanding: int = 0
    error: Optional[str] = None


@dataclass
class _ShardRun:
    shard: Shard
    attempt: int
    window: int
    groups: Optional[int] = None
    done: set = field(default_factory=set)
    error: Optional[str] = None

    def complete(self) -> bool:
        return self.groups is not None and len(self.done) >= self.groups


class Attempts:
    """Shards in flight, by read window: a window is settled once it is read and every block sent to an actor
    has answered; its shards that did not complete then go round again, up to `max_attempts` tries each."""

    def __init__(self, max_attempts: int):
        self.max_attempts = max_attempts
        self.windows: dict[int, _Window] = {}
        self.runs: dict[int, _ShardRun] = {}
        self.failures: list[Failure] = []

    def started(self, wid: int, taken: list[tuple[Shard, int]]) -> None:
        """A reader began window `wid` with these (shard, attempt) pairs."""
        self.windows[wid] = _Window({s.index for s, _ in taken})
        for shard, attempt in taken:
            self.runs[shard.index] = _ShardRun(shard, attempt, wid)

    def read(self, wid: int, error: Optional[str]) -> None:
        """Window `wid` is read to its end (or its read failed: `error`)."""
        window = self.windows[wid]
        window.reading = False
        if error:  # a block lost before the read ended keeps its reason
            window.error = error

    def sent(self, wid: int) -> None:
        """A block of window `wid` went to a model actor."""
        self.windows[wid].outstanding += 1

    def lost(self, wid: int, error: str) -> None:
        """A block of window `wid` came back with no records (the call failed, its actor or block was lost):
        the window's unfinished shards go round again."""
        window = self.windows[wid]
        window.outstanding -= 1
        window.error = error

    def answered(self, wid: int, records: list[dict]) -> list[dict]:
        """A block of window `wid` came back with these chunk records; returns those that count (a late result
        of an earlier try is dropped, an error record marks its shard to go round again)."""
        window = self.windows[wid]
        window.outstanding -= 1
        counted = []
        for record in records:
            run = self.runs.get(record["shard"])
            if run is None or run.window != wid:
                continue  # a late result of an earlier try of a shard that is done or going round again
            if record.get("error"):
                run.error = record["error"]
                continue
            if record.get("groups", -1) > 0:
                run.groups = record["groups"]
            run.done.add(record["chunk"])
            counted.append(record)
            if run.complete():
                del self.runs[record["shard"]]
                window.shards.discard(record["shard"])
        return counted

    def settle(self) -> list[tuple[Shard, int, str]]:
        """Windows that are read and answered: their unfinished shards as (shard, failed attempt, reason) to
        try again; those past `max_attempts` go to `failures` instead."""
        again = []
        for wid, window in list(self.windows.items()):
            if window.reading or window.outstanding:
                continue
            for index in sorted(window.shards):
                run = self.runs.pop(index)
                reason = run.error or window.error or LOST
                if run.attempt < self.max_attempts:
                    again.append((run.shard, run.attempt, reason))
                else:
                    self.failures.append(Failure(run.shard, run.attempt, reason))
            del self.windows[wid]
        return again

    def idle(self) -> bool:
        """No window is in flight."""
        return not self.windows
