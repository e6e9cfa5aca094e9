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


def test_a_block_prefers_an_actor_on_the_node_that_decoded_it():
    pool = _pool("a", "b", "c", calls_per_actor=3)
    a, b, c = pool.members
    for m, node in ((a, "n1"), (b, "n2"), (c, "n2")):
        m.info = {"node": node}
    assert pool.free(node="n2") is b  # a local one, even though a waited longest
    pool.submit(b, 0)
    assert pool.free(node="n2") is c  # of the local ones, the least busy
    pool.submit(c, 1)
    pool.submit(b, 2)
    assert pool.free(node="n2") is c  # local with room beats an idle actor elsewhere
    for k in range(3, 6):
        pool.submit(pool.free(node="n2"), k)
    assert (b.inflight, c.inflight, a.inflight) == (3, 3, 0)
    assert pool.free(node="n2") is a  # every local one full: the block crosses the network
    assert pool.free(node="n9") is a and pool.free() is a  # no actor there, or no node known: least busy


def test_read_windows_follow_the_free_cpus_and_the_peak_of_reads_is_counted():
    from types import SimpleNamespace

    from resnet_batch.embed.scheduler import ReadStats, window_size

    assert [window_size(c, 1.0) for c in (2, 64, 300)] == [64, 64, 300]
    assert window_size(300, 0.5) == 600 and window_size(10, 1.0, least=4) == 10
    reads = ReadStats()

    def meta(task, start, end, node="n1"):
        return SimpleNamespace(exec_stats=SimpleNamespace(task_idx=task, start_time_s=start, end_time_s=end,
                                                          node_id=node))

    # window 0: tasks 0-2 overlap at t=2.5; task 0 yields two blocks; window 1's task 0 starts after them
    for w, t, a, b in ((0, 0, 0, 2), (0, 0, 2, 3), (0, 1, 1, 4), (0, 2, 2.5, 5), (1, 0, 6, 7)):
        assert reads.block(w, meta(t, a, b)) == "n1"
    assert reads.peak_in_flight() == 3
    reads.dispatched(True), reads.dispatched(False), reads.dispatched(True), reads.dispatched(True)
    assert reads.summary() == {"read_tasks": 4, "peak_reads_in_flight": 3, "blocks": 4, "node_local_share": 0.75}
    assert reads.block(0, SimpleNamespace(exec_stats=None)) is None
