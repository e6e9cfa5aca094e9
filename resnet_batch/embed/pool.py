"""pool module: the model actors: started, watched, restarted by Ray, grown with the work, stopped at the end.

Each actor on a GPU runs three calls at once (one computes while the others prepare crops or write parts),
one on CPUs, and gets one more in flight (its block is fetched while the others run). The pool starts `min_actors` and adds one
when blocks have been waiting for every actor for a while, up to `max_actors`: an actor that asks for a GPU
no node has makes the cluster autoscaler add a GPU node, as Ray Data's own actor pools do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import ray

from resnet_batch.embed.model import ActorSettings, EmbedActor

# Calls an actor runs at once: on a device three, so that while one holds the model (the forward pass only),
# another prepares its crops and a third builds and writes its part, and the device never waits for the host;
# on CPUs one, since there the host work would take cores from the forward pass (embed runs over 400
# photos on 2 cores: steady 44-47 img/s with one call at a time, 34-37 with two). One more call waits in
# flight with its block fetched.
GPU_CONCURRENCY, CPU_CONCURRENCY = 3, 1
GROW_AFTER_S = 5.0  # blocks waiting this long for busy actors: add one
MIN_ACTORS_WAIT_S = 30.0  # at the start, wait this long after the first actor for the other min_actors


@dataclass
class Member:
    handle: object
    ready_ref: Optional[object]  # the pending ready() call
    ready: bool = False
    info: dict = field(default_factory=dict)  # node, pid, device, actor (from ready())
    inflight: int = 0
    ask_again_at: Optional[float] = None  # restarting: ask ready() again at this time
    last_sent: float = 0.0  # when it was last given a block: ties go to the one that waited longest


def actor_options(num_cpus: float, num_gpus: float, embedder=None) -> dict:
    """Ray options of a model actor. A device-like stand-in (benchmarks, Python API only) is pipelined as a GPU
    would be."""
    device = bool(num_gpus) or bool(getattr(embedder, "DEVICE_LIKE", False))
    return dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0,
                max_concurrency=GPU_CONCURRENCY if device else CPU_CONCURRENCY)


_REMOTE_ACTOR = ray.remote(EmbedActor)  # one actor class for every actor: Ray exports its definition once


def start_actor(options: dict):
    """A model actor's process, started (torch imported) before it knows its settings or has its weights: both
    come with its first ready() call. A run asks for its first actors as soon as Ray is up, while the weights
    still load (runner.py)."""
    return _REMOTE_ACTOR.options(**options).remote()


def stop_actors(handles) -> None:
    """Stop these actors for good (no restart); one already gone is no error."""
    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass


class ModelPool:
    """Model actors between min and max; the driver dispatches blocks to the least busy ready actor."""

    def __init__(self, settings: ActorSettings, weights, *, min_actors: int, max_actors: int, num_cpus: float,
                 num_gpus: float, started: Sequence = ()):
        """`started`: actors already asked for with the same options (start_actor), taken over by the pool."""
        self.settings, self.weights = settings, weights  # weights: an ObjectRef of the state dict
        self.min, self.max = min_actors, max_actors
        self.options = actor_options(num_cpus, num_gpus, settings.embedder)
        self.calls_per_actor = self.options["max_concurrency"] + 1
        self.members: list[Member] = []
        self.starved_since: Optional[float] = None
        self.first_ready: Optional[float] = None
        self.waiting_for_min = True
        self.seen: dict[str, dict] = {}  # every actor that ever became ready: actor id -> info
        for handle in started:
            self._adopt(handle)
        for _ in range(min_actors - len(started)):
            self._start()

    def _start(self) -> None:
        self._adopt(start_actor(self.options))

    def _adopt(self, handle) -> None:
        self.members.append(Member(handle, handle.ready.remote(self.weights, self.settings)))

    # -- readiness -------------------------------------------------------------------------------
    def pending_refs(self) -> list:
        return [m.ready_ref for m in self.members if m.ready_ref is not None]

    def on_ready(self, ref) -> Optional[BaseException]:
        """A ready() call finished: the actor is up; or Ray is restarting it (ask again soon); or it could
        not start at all (returned, for the caller to decide)."""
        for m in self.members:
            if m.ready_ref == ref:
                m.ready_ref = None
                try:
                    m.info = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:  # restarting: ask again in a moment
                    m.ask_again_at = time.monotonic() + 1.0
                    return None
                except Exception as err:  # could not start (e.g. require_cuda), or gone for good
                    self.members.remove(m)
                    stop_actors([m.handle])  # ready() raised in a live actor: its process goes too
                    if m.info and len(self.members) < self.min:
                        self._start()  # it had been working: replace it
                    return None if m.info else err
                m.ready = True
                self.first_ready = self.first_ready or time.perf_counter()
                self.seen[m.info["actor"]] = m.info
                return None
        return None

    def on_died(self, member: Member) -> None:
        """A call failed because the actor died: Ray restarts it; wait until it answers ready() again (which
        also gives a restarted actor its weights)."""
        if member in self.members and member.ready:
            member.ready = False
            member.ask_again_at = time.monotonic()

    def poll(self) -> None:
        """Ask restarting actors whether they are back."""
        now = time.monotonic()
        for m in self.members:
            if m.ask_again_at is not None and now >= m.ask_again_at and m.ready_ref is None:
                m.ask_again_at = None
                m.ready_ref = m.handle.ready.remote(self.weights, self.settings)

    # -- dispatch --------------------------------------------------------------------------------
    def free(self, node: Optional[str] = None) -> Optional[Member]:
        """A ready actor with room for one more call: one on `node` (the node that decoded the block, so the
        block never crosses the network) when one has room, as Ray Data's locality-aware actor pools do;
        else, and among those, the one with the fewest calls in flight, then the one given a block longest
        ago, so that actors faster than the reads still share the work. At the start the pool waits for its
        min_actors (up to MIN_ACTORS_WAIT_S after the first is up), so that the work of a run is shared by the
        actors it asked for rather than taken by whichever imported torch first."""
        if self.first_ready is None:
            return None
        if self.waiting_for_min and (sum(m.ready for m in self.members) < min(self.min, len(self.members))
                                     and time.perf_counter() - self.first_ready < MIN_ACTORS_WAIT_S):
            return None
        self.waiting_for_min = False
        ready = [m for m in self.members if m.ready and m.inflight < self.calls_per_actor]
        local = lambda m: node is not None and m.info.get("node") == node  # noqa: E731
        return min(ready, key=lambda m: (not local(m), m.inflight, m.last_sent)) if ready else None

    def submit(self, member: Member, *args):
        member.inflight += 1
        member.last_sent = time.monotonic()
        return member.handle.process.remote(*args)

    def done(self, member: Member) -> None:
        member.inflight -= 1

    def ready_count(self) -> int:
        return sum(m.ready for m in self.members)

    def reserved_cpus(self) -> float:
        """CPUs the pool's actors hold (or are about to): reads must leave them free."""
        return max(len(self.members), self.min) * self.options["num_cpus"]

    def maybe_grow(self, waiting_blocks: int) -> bool:
        """Add an actor when decoded blocks have kept waiting for GROW_AFTER_S (called right after dispatch,
        so waiting blocks mean every ready actor is full), up to max_actors, one starting at a time."""
        if waiting_blocks == 0 or len(self.members) >= self.max or any(not m.ready for m in self.members):
            self.starved_since = None
            return False
        now = time.monotonic()
        if self.starved_since is None:
            self.starved_since = now
            return False
        if now - self.starved_since < GROW_AFTER_S:
            return False
        self._start()
        self.starved_since = None
        return True

    def shutdown(self) -> None:
        stop_actors([m.handle for m in self.members])
        self.members = []
