"""Planning and bookkeeping as pure functions, without Ray: shard cutting, the sync diff, which shards are
complete, the verdict of a run, failures grouped by reason."""
import pyarrow as pa
import pytest

from resnet_batch.config import InputConfig
from resnet_batch.embed.listing import ENTRY_SCHEMA, ShardCutter
from resnet_batch.output.manifest import MANIFEST_SCHEMA
from resnet_batch.embed.plan import complete_shards, diff, expected_counts, pending_entries, todo_shards
from resnet_batch.embed.report import RunStats, stages
from resnet_batch.output.failures import failure_groups, reason_key
from resnet_batch.embed.attempts import _ShardRun
from resnet_batch.schema import PART_RECORD_SCHEMA


def _entries(paths, sizes=None, mtimes=None, etags=None) -> pa.Table:
    n = len(paths)
    return pa.table({"path": [p.encode() for p in paths], "size": sizes or [100] * n, "mtime_ns": mtimes or [1] * n,
                     "etag": pa.array(etags or [None] * n, pa.binary())}, schema=ENTRY_SCHEMA)


def _manifest(rows) -> pa.Table:
    """rows: (path, size, mtime, etag, shard)"""
    return pa.table({"path": [r[0].encode() for r in rows], "size": [r[1] for r in rows],
                     "mtime_ns": [r[2] for r in rows], "etag": pa.array([r[3] for r in rows], pa.binary()),
                     "shard": pa.array([r[4] for r in rows], pa.int64())}, schema=MANIFEST_SCHEMA)


def test_cutter_groups_folders_skips_hidden_and_other_files_and_honours_the_limit():
    got = []
    cfg = InputConfig(uri="/x", images_per_shard=3, limit=7)
    cut = ShardCutter(cfg, "folder", "/x", 10, lambda shard, entries: got.append((shard, len(entries))))
    cut.add(_entries(["a/1.jpg", "a/2.JPG", ".DS_Store", "a/.hidden.jpg", "notes.txt", "a/3.png", "b/4.jpg"]))
    cut.add(_entries(["b/5.jpg", "b/6.jpg", "b/7.jpg", "b/8.jpg"]))
    cut.finish()
    assert [(s.index, n) for s, n in got] == [(10, 3), (11, 3), (12, 1)]
    assert got[0][0].paths == ("/x/a/1.jpg", "/x/a/2.JPG", "/x/a/3.png") and got[0][0].sizes == (100, 100, 100)
    assert cut.skipped.count == 3 and sorted(cut.skipped.examples) == [".DS_Store", "a/.hidden.jpg", "notes.txt"]
    assert cut.stopped and cut.images == 7


def test_diff_finds_new_changed_deleted_and_copies():
    cfg = InputConfig(uri="/x", images_per_shard=2)
    manifest = _manifest([("a.jpg", 10, 1, b"e1", 0), ("b.jpg", 20, 1, b"e2", 0), ("c.jpg", 30, 1, b"e3", 1),
                          ("d.jpg", 40, 1, b"e4", 1)])
    current = _entries(["a.jpg", "b.jpg", "d.jpg", "moved/c.jpg", "new.jpg"], sizes=[10, 21, 40, 30, 50],
                       etags=[b"e1", b"e2x", b"e4", b"e3", b"e5"])
    plan = diff(cfg, "folder", "/x", current, manifest, done={0, 1}, next_shard=2)
    assert plan.counts == {"listed": 5, "unchanged": 2, "new": 1, "changed": 1, "deleted": 1, "reused": 1}
    assert sorted(zip(plan.drops.column("shard").to_pylist(), plan.drops.column("path").to_pylist())) == \
        [(0, b"b.jpg"), (1, b"c.jpg")]
    assert plan.copies.to_pylist() == [{"shard": 2, "path": b"moved/c.jpg", "old_shard": 1, "old_path": b"c.jpg"}]
    new = sorted(zip(plan.new_entries.column("path").to_pylist(), plan.new_entries.column("shard").to_pylist()))
    assert new == [(b"b.jpg", 3), (b"moved/c.jpg", 2), (b"new.jpg", 3)] and plan.next_shard == 4


def test_diff_compares_mtimes_where_there_are_no_etags_and_never_copies_local_files():
    cfg = InputConfig(uri="/x", images_per_shard=10)
    manifest = _manifest([("a.jpg", 10, 5, None, 0), ("b.jpg", 10, 5, None, 0)])
    plan = diff(cfg, "folder", "/x", _entries(["a.jpg", "b.jpg", "c.jpg"], sizes=[10, 10, 10], mtimes=[5, 6, 5]),
                manifest, done={0}, next_shard=1)
    assert (plan.counts["changed"], plan.counts["new"], plan.counts["reused"]) == (1, 1, 0)
    assert plan.touches_output() and len(plan.copies) == 0


def test_completion_of_shards_from_the_ledger():
    records = pa.Table.from_pylist([
        {"part": "part-000000.parquet", "shard": 0, "chunk": -1, "chunks": 1, "rows": 3, "ok": 3, "failed": 0},
        {"part": "part-000001-0000.parquet", "shard": 1, "chunk": 0, "chunks": -1, "rows": 2, "ok": 1, "failed": 1},
        {"part": "", "shard": 1, "chunk": 1, "chunks": 2, "rows": 0, "ok": 0, "failed": 0, "skipped": 4},
        {"part": "part-000002-0000.parquet", "shard": 2, "chunk": 0, "chunks": -1, "rows": 5, "ok": 5, "failed": 0},
    ], schema=PART_RECORD_SCHEMA)
    done, by_shard = complete_shards(records)
    assert done == {0, 1}  # shard 2 never said how many chunks it has
    assert by_shard[1]["rows"] == 2 and by_shard[1]["skipped"] == 4 and by_shard[1]["failed"] == 1
    manifest = _manifest([("a", 1, 1, None, 0), ("t.tar", 1, 1, None, 1), ("u.tar", 1, 1, None, 2),
                          ("v.tar", 1, 1, None, 3)])
    assert expected_counts(manifest) == {0: 1, 1: 1, 2: 1, 3: 1}
    todo = list(todo_shards("webdataset", "/in", pending_entries(manifest, done)))
    assert [(s.index, s.kind, s.paths) for s in todo] == [(2, "webdataset", ("/in/u.tar",)),
                                                         (3, "webdataset", ("/in/v.tar",))]


def test_a_shard_in_flight_completes_when_every_chunk_arrived():
    run = _ShardRun(shard=None, attempt=1, window=0)
    run.done |= {0, 2}
    assert not run.complete()
    run.groups = 3
    assert not run.complete()
    run.done.add(1)
    assert run.complete()


def _stats(model_s, write_s, window=60.0, parts=10, actors=1) -> RunStats:
    st = RunStats()
    st.first, st.last, st.parts, st.images = (0.0, 10), window, parts, 1000
    st.steady_model_s, st.steady_write_s = model_s * window * actors, write_s * window * actors
    return st


@pytest.mark.parametrize("model, write, verdict", [(0.95, 0.1, "model-bound"), (0.3, 0.9, "write-bound"),
                                                   (0.4, 0.1, "input-bound"), (0.5, 0.6, "write-bound")])
def test_verdict_from_the_actors_busy_time(model, write, verdict):
    out = stages(_stats(model, write), actors=1)
    assert out["verdict"] == verdict and out["model_busy_fraction"] == pytest.approx(model)


def test_no_verdict_without_enough_work():
    assert stages(RunStats(), 1)["verdict"] == "nothing to do"
    assert stages(_stats(1.0, 0.0, window=5.0), 1)["verdict"] == "too little work to judge"


def test_failures_group_by_reason_with_examples():
    t = pa.table({"image_id": [f"i{i}" for i in range(6)],
                  "status": ["decode_error"] * 4 + ["ok", "read_error"],
                  "error": ["corrupt image: 12 bytes", "corrupt image: 7 bytes", "corrupt image: 99 bytes",
                            "not an image (format not recognised)", None, "PermissionError: denied"]})
    groups = failure_groups([t])
    assert [(g["count"], g["status"]) for g in groups] == [(3, "decode_error"), (1, "decode_error"), (1, "read_error")]
    assert groups[0]["examples"] == ["i0", "i1", "i2"]
    assert reason_key("file 'a.jpg' is 3 bytes") == reason_key("file 'b.jpg' is 44 bytes")
