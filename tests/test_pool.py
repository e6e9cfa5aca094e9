"""The pool's dispatch policy, without Ray: which ready actor gets the next block."""
from __future__ import annotations

from resnet_batch.embed.pool import Member, ModelPool


class _Handle:
    """Stands for an actor handle: records the calls made on it."""

    def __init__(self, name: str):
        self.name, self.calls = name, []
        self.process = self

    def remote(self, *args):
        self.calls.append(args)
        return (self.name, len(self.calls))


def _pool(*names: str, calls_per_actor: int = 2) -> ModelPool:
    pool = ModelPool.__new__(ModelPool)  # no Ray: only the bookkeeping that dispatch reads
    pool.min, pool.max, pool.calls_per_actor = len(names), len(names), calls_per_actor
    pool.members = [Member(_Handle(n), None, ready=True) for n in names]
    pool.first_ready, pool.waiting_for_min = 0.0, False
    return pool


def test_actors_faster_than_the_reads_still_share_the_work():
    """Each block is done before the next arrives (every actor idle at each dispatch): they take turns."""
    pool = _pool("a", "b", "c")
    order = []
    for block in range(6):
        member = pool.free()
        pool.submit(member, block)
        order.append(member.handle.name)
        pool.done(member)
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_least_busy_first_and_none_when_all_are_full():
    pool = _pool("a", "b", calls_per_actor=2)
    a, b = pool.members
    pool.submit(a, 0)
    assert pool.free() is b  # fewer calls in flight wins over having waited longer
    pool.submit(b, 1)
    pool.submit(pool.free(), 2)
    pool.submit(pool.free(), 3)
    assert (a.inflight, b.inflight) == (2, 2) and pool.free() is None
    pool.done(b)
    assert pool.free() is b
