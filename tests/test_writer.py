"""The output folder without Ray: part names and encoding, deleting only what this job wrote, transient-error
retries with backoff, the manifest and the ledger."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_batch.errors import OutputError
from resnet_batch.output.ledger import LedgerWriter, latest, read_ledger, recover
from resnet_batch.output.manifest import MANIFEST_SCHEMA, ManifestWriter, drop_entries, piece_range, read_manifest
from resnet_batch.retry import TransientExhausted, is_transient, retrying
from resnet_batch.schema import OUTPUT_SCHEMA, PART_STATS_KEY, WRITER_KEY, embedding_array, read_provenance, \
    with_provenance
from resnet_batch.output.store import OutputStore, encode_part, parse_part, part_name


def _rows(ids, ok):
    n = len(ids)
    return pa.table({
        "image_id": ids, "path": [f"/x/{i}" for i in ids], "width": pa.array([10] * n, pa.int32()),
        "height": pa.array([10] * n, pa.int32()), "topk_ids": pa.array([[1, 2]] * n, pa.list_(pa.int32())),
        "topk_labels": pa.array([["a", "b"]] * n, pa.list_(pa.string())),
        "topk_probs": pa.array([[0.6, 0.4]] * n, pa.list_(pa.float32())),
        "embedding": embedding_array(np.ones((n, 2048), np.float32), np.array(ok)),
        "status": ["ok" if o else "decode_error" for o in ok], "error": [None if o else "bad" for o in ok],
    })


def test_part_names_are_ours_only():
    assert part_name(3) == "part-000003.parquet" and part_name(3, 12) == "part-000003-0012.parquet"
    assert parse_part("part-000003.parquet") == (3, -1) and parse_part("part-1234567-0002.parquet") == (1234567, 2)
    # Spark's and others' names are not ours
    for foreign in ("part-00000-8f6a.snappy.parquet", "part-3.parquet", "part-000003.parquet.tmp", "x.parquet"):
        assert parse_part(foreign) is None


def test_part_is_sorted_typed_and_stamped(tmp_path):
    schema = with_provenance(OUTPUT_SCHEMA, {"model": "m"})
    record = {"rows": 3, "ok": 2, "failed": 1}
    data = encode_part(_rows(["b", "c", "a"], [True, False, True]), schema, record, "zstd", "node-1", 42)
    path = tmp_path / "p.parquet"
    path.write_bytes(data)
    t = pq.read_table(path)
    assert t.column("image_id").to_pylist() == ["a", "b", "c"]
    assert t.schema.remove_metadata().equals(OUTPUT_SCHEMA)
    assert read_provenance(t.schema) == {"model": "m"}
    meta = pq.read_metadata(path).metadata
    assert json.loads(meta[PART_STATS_KEY]) == record
    assert json.loads(meta[WRITER_KEY])["node_id"] == "node-1" and json.loads(meta[WRITER_KEY])["pid"] == 42


def test_fresh_clear_removes_only_our_files(tmp_path):
    out = tmp_path / "out"
    store = OutputStore(str(out), {})
    store.write("_provenance.json", {"a": 1})
    store.write("_SUCCESS", {})
    (out / "part-000000.parquet").write_bytes(b"x")
    (out / "part-000001-0003.parquet").write_bytes(b"x")
    (out / ".part-000002.parquet.tmp-0123abcd").write_bytes(b"x")
    (out / "_manifest").mkdir()
    (out / "_manifest" / "m-000000-000001.parquet").write_bytes(b"x")
    keep = ["users-notes.txt", "part-00000-1b2c.snappy.parquet", "_spark_metadata", ".tmp-mine", "photo.jpg"]
    for name in keep:
        (out / name).write_text("keep me")
    assert store.published()
    deleted = store.clear()
    assert sorted(p.name for p in out.iterdir()) == sorted(keep)
    assert "part-000001-0003.parquet" in deleted and "_SUCCESS" in deleted


def test_fresh_refuses_a_folder_that_is_not_an_output(tmp_path):
    out = tmp_path / "spark-output"
    out.mkdir()
    (out / "_SUCCESS").write_text("")
    (out / "part-000000.parquet").write_text("someone else's")
    with pytest.raises(OutputError, match=r"is not a resnet-batch output .* refusing to delete anything"):
        OutputStore(str(out), {}).clear()
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "part-000000.parquet"]
    assert OutputStore(str(tmp_path / "empty"), {}).clear() == []


def test_remove_temp_files_only_matches_our_temp_names(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ours = [".part-000007.parquet.tmp-0a1b2c3d", "._state.json.tmp-ffffffff"]
    theirs = ["report.tmp-1", ".photo.jpg.tmp-0a1b2c3d", "data.tmp-0a1b2c3d"]
    for name in ours + theirs:
        (out / name).write_text("x")
    assert OutputStore(str(out), {}).remove_temp_files() == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(theirs)


def test_retrying_recovers_from_transient_errors_with_backoff():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    clock = iter(range(100)).__next__
    assert retrying(flaky, 60, "x", sleep=sleeps.append, clock=lambda: float(clock())) == "done"
    assert len(calls) == 4 and len(sleeps) == 3 and all(s >= 0 for s in sleeps)


@pytest.mark.parametrize("error, transient", [
    (TimeoutError("endpoint timed out"), True), (ConnectionRefusedError(111, "refused"), True),
    (PermissionError("denied"), False), (FileNotFoundError("nope"), False), (ValueError("bad"), False),
])
def test_transient_or_permanent(error, transient):
    assert is_transient(error) is transient


def test_transient_window_ends_with_a_clear_error_and_permanent_errors_are_not_retried():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    t = iter(range(0, 1000, 10)).__next__
    with pytest.raises(TransientExhausted, match=r"writing x: ConnectionRefusedError: .* \(transient; \d+ tries over "
                                                 r"\d+s, compute.retry_window_s=30\)"):
        retrying(down, 30, "writing x", sleep=lambda s: None, clock=lambda: float(t()))
    assert len(calls) > 1
    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        retrying(denied, 30, sleep=lambda s: None)
    assert len(calls) == 1


def test_manifest_pieces_round_trip_and_drop(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    released = []
    writer = ManifestWriter(store, released.extend, piece_entries=3, flush_s=1e9)

    class S:
        def __init__(self, i):
            self.index = i

    for i in range(4):
        entries = pa.table({"path": [f"d/{i}-{j}.jpg".encode() for j in range(2)], "size": [10, 20],
                            "mtime_ns": [1, 2], "etag": pa.array([None, None], pa.binary())})
        writer.add(S(i), entries)
    writer.flush()
    assert [s.index for s in released] == [0, 1, 2, 3]  # released only once stored
    names = store.list_dir("_manifest")
    assert [piece_range(n) for n in names] == [(0, 1), (2, 3)]
    m = read_manifest(store)
    assert m.schema.equals(MANIFEST_SCHEMA) and len(m) == 8 and sorted(set(m.column("shard").to_pylist())) == [0, 1, 2, 3]
    drops = pa.table({"shard": pa.array([1, 1], pa.int64()), "path": [b"d/1-0.jpg", b"d/1-1.jpg"]})
    assert drop_entries(store, drops) == 1
    assert drop_entries(store, drops) == 0  # idempotent
    m = read_manifest(store)
    assert sorted(set(m.column("shard").to_pylist())) == [0, 2, 3] and len(m) == 6


def test_ledger_latest_record_wins_and_lost_records_are_recovered_from_parts(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    ledger = LedgerWriter(store, run=1)
    ledger.add({"part": "part-000000.parquet", "shard": 0, "chunk": -1, "chunks": 1, "rows": 3, "ok": 2,
                "failed": 1, "written_at": 1.0})
    ledger.add({"part": "part-000000.parquet", "shard": 0, "chunk": -1, "chunks": 1, "rows": 3, "ok": 3,
                "failed": 0, "written_at": 2.0})
    ledger.flush()
    t = read_ledger(store)
    assert t.to_pylist()[0]["ok"] == 3 and len(t) == 1
    assert len(latest(t)) == 1
    record = {"part": "part-000001.parquet", "shard": 1, "chunk": -1, "rows": 1, "ok": 1, "failed": 0}
    schema = with_provenance(OUTPUT_SCHEMA, {"model": "m"})
    (tmp_path / "out" / "part-000001.parquet").write_bytes(encode_part(_rows(["z"], [True]), schema, record, None,
                                                                       "n", 1))
    assert recover(store, ["part-000001.parquet"]) == [record]
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "part-000002.parquet")
    with pytest.raises(OutputError, match=r"part-000002.parquet was not written by resnet-batch .* move it out"):
        recover(store, ["part-000002.parquet"])
    (tmp_path / "out" / "part-000003.parquet").write_bytes(b"not parquet")
    with pytest.raises(OutputError, match=r"part-000003.parquet is not a readable Parquet part .* --fresh"):
        recover(store, ["part-000003.parquet"])


def test_persistent_write_failure_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = OutputStore(str(blocker / "out"), {}, retry_window_s=1)
    with pytest.raises(NotADirectoryError):
        store.write("_SUCCESS", {})
