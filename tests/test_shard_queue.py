"""ShardQueue, the hand-over between the planner, the read threads and the scheduler's loop (no Ray).

The loop ends when the queue is empty and nothing is in flight; shards a reader has taken but not yet
announced as a window are in neither place, so the queue must not count as empty while a reader holds them.
"""
from __future__ import annotations

from resnet_batch.embed.listing import Shard
from resnet_batch.embed.scheduler import ShardQueue


def _shards(n: int) -> list[Shard]:
    return [Shard(i, "files", (f"/photos/{i}.jpg",)) for i in range(n)]


def test_taken_shards_keep_the_queue_busy_until_handed_over():
    q = ShardQueue()
    q.put(_shards(3))
    taken = q.take(64, wait_s=0)
    q.close()  # the planner is done while the reader still holds the shards (it asks Ray for resources)
    assert [s.index for s, _ in taken] == [0, 1, 2] and [a for _, a in taken] == [1, 1, 1]
    assert not q.empty()
    q.handed_over(len(taken))
    assert q.empty()


def test_open_queue_is_not_empty_and_retries_come_first():
    q = ShardQueue()
    assert not q.empty()  # the planner may still hand over shards
    q.put(_shards(2))
    first = q.take(1, wait_s=0)
    q.retry(first[0][0], 2)
    q.close()
    again = q.take(64, wait_s=0)
    assert [(s.index, a) for s, a in again] == [(0, 2), (1, 1)]
    q.handed_over(len(first))
    assert not q.empty()
    q.handed_over(len(again))
    assert q.empty()
