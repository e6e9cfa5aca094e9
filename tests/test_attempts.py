"""The scheduler's rules for results and retries (embed/attempts.py, no Ray): a late result of an earlier try
never counts, a shard is done when every chunk has come back, and a window's unfinished shards go round again
until compute.max_attempts, then fail with the reason that was seen."""
from __future__ import annotations

from resnet_batch.embed.attempts import LOST, Attempts
from resnet_batch.embed.listing import Shard


def _shard(i: int) -> Shard:
    return Shard(i, "files", (f"/photos/{i}.jpg",))


def _record(shard: int, chunk: int, groups: int = -1, error: str = "") -> dict:
    return {"shard": shard, "chunk": chunk, "groups": groups, "error": error, "rows": 1}


def test_a_shard_is_done_when_every_chunk_came_back_and_the_window_settles_with_nothing_to_retry():
    book = Attempts(max_attempts=3)
    book.started(0, [(_shard(0), 1), (_shard(1), 1)])
    book.sent(0)
    book.sent(0)
    counted = book.answered(0, [_record(0, 0), _record(1, 0, groups=1)])
    assert [(r["shard"], r["chunk"]) for r in counted] == [(0, 0), (1, 0)]
    book.read(0, None)
    assert book.settle() == []  # one block still out: the window is not settled, shard 0 not judged
    assert not book.idle()
    counted = book.answered(0, [_record(0, 1, groups=2)])  # the last chunk says how many there are
    assert [(r["shard"], r["chunk"]) for r in counted] == [(0, 1)]
    assert book.settle() == [] and book.idle() and book.failures == []


def test_a_window_is_not_judged_while_it_is_still_being_read():
    book = Attempts(max_attempts=3)
    book.started(0, [(_shard(0), 1)])
    assert book.settle() == [] and not book.idle()
    book.read(0, None)  # read to the end, no block ever came: the shard produced nothing
    assert book.settle() == [(_shard(0), 1, LOST)]
    assert book.idle()


def test_a_late_result_of_an_earlier_try_is_dropped():
    book = Attempts(max_attempts=3)
    book.started(0, [(_shard(5), 1)])
    book.sent(0)
    book.sent(0)
    book.read(0, None)
    book.lost(0, "model actor lost (killed)")
    # the first try's window still waits for its other block: the shard is not judged yet
    assert book.settle() == []
    assert book.answered(0, [_record(5, 0)]) != []  # counted: the window is still this shard's try
    again = book.settle()
    assert again == [(_shard(5), 1, "model actor lost (killed)")]
    book.started(1, [(_shard(5), 2)])  # the second try, in a new window
    book.sent(1)
    book.started(2, [(_shard(6), 1)])
    book.sent(2)
    # a block of the first window answering now (it cannot: settled), or a record for shard 5 arriving with
    # another window's block, is a late result: it never counts for the second try
    assert book.answered(2, [_record(5, 0, groups=1), _record(6, 0, groups=1)]) == [_record(6, 0, groups=1)]
    assert book.answered(1, [_record(5, 0, groups=1)]) == [_record(5, 0, groups=1)]
    book.read(1, None)
    book.read(2, None)
    assert book.settle() == [] and book.failures == [] and book.idle()


def test_results_for_a_finished_shard_are_dropped():
    book = Attempts(max_attempts=3)
    book.started(0, [(_shard(0), 1)])
    book.sent(0)
    book.sent(0)
    assert len(book.answered(0, [_record(0, 0, groups=1)])) == 1
    assert book.answered(0, [_record(0, 0, groups=1)]) == []  # the shard is complete: a repeat is not counted
    book.read(0, None)
    assert book.settle() == [] and book.failures == []


def test_an_error_record_sends_its_shard_round_again_with_its_reason_then_fails_after_the_last_try():
    book = Attempts(max_attempts=2)
    for attempt, wid in ((1, 0), (2, 1)):
        book.started(wid, [(_shard(3), attempt), (_shard(4), attempt)])
        book.sent(wid)
        counted = book.answered(wid, [_record(3, 0, error="store unreachable: timed out"),
                                      _record(4, 0, groups=1)])
        assert [r["shard"] for r in counted] == [4]  # the failed chunk is not passed on as a result
        book.read(wid, None)
        again = book.settle()
        if attempt == 1:
            assert again == [(_shard(3), 1, "store unreachable: timed out")]
    assert again == []
    assert [(f.shard.index, f.attempts, f.reason) for f in book.failures] == [(3, 2, "store unreachable: timed out")]
    assert book.idle()


def test_a_failed_read_sends_every_unfinished_shard_of_its_window_round_again():
    book = Attempts(max_attempts=3)
    book.started(0, [(_shard(0), 1), (_shard(1), 1), (_shard(2), 2)])
    book.sent(0)
    book.answered(0, [_record(1, 0, groups=1)])  # shard 1 finished before the read failed
    book.read(0, "reading failed: OSError: connection reset")
    assert book.settle() == [(_shard(0), 1, "reading failed: OSError: connection reset"),
                             (_shard(2), 2, "reading failed: OSError: connection reset")]
    assert book.failures == []


def test_a_shard_reason_wins_over_its_window_reason():
    book = Attempts(max_attempts=1)
    book.started(0, [(_shard(0), 1), (_shard(1), 1)])
    book.sent(0)
    book.sent(0)
    book.answered(0, [_record(0, 0, error="model raised: RuntimeError: boom")])
    book.lost(0, "model actor lost (node died)")
    book.read(0, None)
    assert book.settle() == []  # max_attempts=1: nothing goes round again
    assert [(f.shard.index, f.reason) for f in book.failures] == [(0, "model raised: RuntimeError: boom"),
                                                                  (1, "model actor lost (node died)")]
