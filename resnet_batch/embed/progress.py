"""progress module: what a person sees while a run goes: a live bar in a terminal, a plain line every N
seconds elsewhere (Ray job logs, CI), nothing with --quiet. Same facts in both: images done of planned,
failed, img/s, ETA, and which stage holds the run back."""
from __future__ import annotations

import sys
import time
from collections import deque
from typing import Optional

from resnet_batch.embed.report import RunStats


class Progress:
    """What the scheduler reports as it goes (the CLI's progress display implements it)."""

    def planned(self, images: Optional[int], final: bool) -> None:
        """Images to do (None when unknown: tar and Parquet files), and whether the listing has ended."""

    def update(self, stats: RunStats, waiting: int, actors: int) -> None:
        """Called from the driver's loop: what is done, blocks waiting for an actor, actors ready."""

    def close(self) -> None:
        """The run's work is over (the summary follows)."""


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Facts:
    """Rate over the last minute, ETA, and the stage that is the limit right now."""

    def __init__(self):
        self.planned, self.final, self.unknown = 0, False, False
        self.samples: deque = deque(maxlen=120)

    def planned_images(self, images: Optional[int], final: bool) -> None:
        """Images to do (None: unknown, e.g. inside tar files), and whether that number is final."""
        self.unknown = images is None
        self.planned, self.final = max(self.planned, images or 0), final

    def observe(self, stats: RunStats, waiting: int, actors: int) -> dict:
        now = time.perf_counter()
        self.samples.append((now, stats.images))
        t0, n0 = self.samples[0]
        rate = (stats.images - n0) / (now - t0) if now - t0 >= 2 else None
        left = max(self.planned - stats.images, 0)
        eta = left / rate if rate and self.final and not self.unknown else None
        if not actors:
            stage = "starting model actors"
        elif waiting:
            stage = "model-bound"
        elif stats.images:
            stage = "waiting for input"
        else:
            stage = "reading"
        total = "?" if self.unknown else (f"{self.planned:,}" if self.final else f"{self.planned:,}+ (listing)")
        return {"done": stats.images, "total": total, "planned": self.planned, "failed": stats.failed,
                "rate": rate, "eta": eta, "stage": stage, "actors": actors}


class LineProgress(Progress):
    """A plain line every `every_s` seconds (and a last one), for logs."""

    def __init__(self, every_s: float = 30.0, stream=None):
        self.every_s, self.stream = every_s, stream or sys.stderr  # sys.stderr as it is now, not at import
        self.facts = _Facts()
        self.last = time.perf_counter()
        self.latest: Optional[dict] = None

    def planned(self, images: Optional[int], final: bool) -> None:
        self.facts.planned_images(images, final)

    def update(self, stats: RunStats, waiting: int, actors: int) -> None:
        self.latest = self.facts.observe(stats, waiting, actors)
        if time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            self._line()

    def _line(self) -> None:
        f = self.latest
        if f is None:
            return
        rate = f"{f['rate']:,.1f} img/s" if f["rate"] is not None else "- img/s"
        eta = f", ETA {_hms(f['eta'])}" if f["eta"] is not None else ""
        print(f"[resnet-batch] {f['done']:,}/{f['total']} images, {f['failed']:,} failed, {rate}{eta}, "
              f"{f['actors']} actor(s), {f['stage']}", file=self.stream, flush=True)

    def close(self) -> None:
        self._line()


class TerminalProgress(Progress):
    """One live progress bar (rich) that ends cleanly when the run does."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.facts = _Facts()
        self.bar = Bar(TextColumn("[bold]embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn(), console=self.console, transient=False, refresh_per_second=4)
        self.task = self.bar.add_task("embed", total=None, info="listing…")
        self.started = False

    def planned(self, images: Optional[int], final: bool) -> None:
        self.facts.planned_images(images, final)

    def update(self, stats: RunStats, waiting: int, actors: int) -> None:
        if not self.started:
            self.bar.start()
            self.started = True
        f = self.facts.observe(stats, waiting, actors)
        rate = f"{f['rate']:,.1f} img/s" if f["rate"] is not None else "…"
        listing = "" if self.facts.final else ", listing…"
        self.bar.update(self.task, completed=f["done"], total=None if self.facts.unknown else (f["planned"] or None),
                        info=f"{f['failed']:,} failed, {rate}, {f['stage']}{listing}")

    def close(self) -> None:
        if self.started:
            self.bar.stop()
            self.started = False


def make_progress(quiet: bool, every_s: float, stream=None) -> Progress:
    """Nothing with --quiet; a live bar in a terminal; plain lines every `every_s` seconds otherwise."""
    stream = stream or sys.stderr
    if quiet:
        return Progress()
    if stream.isatty():
        return TerminalProgress()
    return LineProgress(every_s, stream)
