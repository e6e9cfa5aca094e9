"""The output store without Ray: atomic parts, deterministic names, retries, success marker."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_batch.listing import Shard
from resnet_batch.schema import OUTPUT_SCHEMA, embedding_array, with_provenance, read_provenance
from resnet_batch.writer import OutputError, OutputStore, with_retries


def _rows(ids, ok):
    import numpy as np

    n = len(ids)
    return pa.table({
        "image_id": ids, "path": [f"/x/{i}" for i in ids], "width": pa.array([10] * n, pa.int32()),
        "height": pa.array([10] * n, pa.int32()), "topk_ids": pa.array([[1, 2]] * n, pa.list_(pa.int32())),
        "topk_labels": pa.array([["a", "b"]] * n, pa.list_(pa.string())),
        "topk_probs": pa.array([[0.6, 0.4]] * n, pa.list_(pa.float32())),
        "embedding": embedding_array(np.ones((n, 2048), np.float32), np.array(ok)),
        "status": ["ok" if o else "decode_error" for o in ok], "error": [None if o else "bad" for o in ok],
        "_shard": [3] * n,
    })


def test_part_is_sorted_typed_and_stamped(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    schema = with_provenance(OUTPUT_SCHEMA, {"model": "m"})
    store.write_part(Shard(3, "files", ()), _rows(["b", "c", "a"], [True, False, True]), schema,
                     {"rows": 3, "ok": 2, "failed": 1, "skipped": 0})
    assert store.done_parts() == {"part-000003.parquet"}
    t = pq.read_table(tmp_path / "out" / "part-000003.parquet")
    assert t.column("image_id").to_pylist() == ["a", "b", "c"]
    assert t.schema.remove_metadata().equals(OUTPUT_SCHEMA)  # internal columns dropped
    assert read_provenance(t.schema) == {"model": "m"}
    assert store.part_stats("part-000003.parquet") == {"rows": 3, "ok": 2, "failed": 1, "skipped": 0}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["part-000003.parquet"]  # no temp files left


def test_fresh_clear_removes_only_our_files(tmp_path):
    out = tmp_path / "out"
    store = OutputStore(str(out), {})
    store.write_json("_provenance.json", {"a": 1})
    store.write_json("_SUCCESS", {})
    (out / "part-000000.parquet").write_bytes(b"x")
    (out / "users-notes.txt").write_text("keep me")
    assert store.published()
    store.clear()
    assert sorted(p.name for p in out.iterdir()) == ["users-notes.txt"]


def test_with_retries_recovers_from_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    assert with_retries(flaky, attempts=5, base_delay=0.01) == "done" and len(calls) == 3


@pytest.mark.parametrize("error, calls_expected", [
    (TimeoutError("endpoint timed out"), 3),  # transient: retried until the attempts run out
    (PermissionError("denied"), 1),  # permanent: not retried
])
def test_with_retries_gives_up_and_does_not_retry_permanent_errors(error, calls_expected):
    calls = []

    def failing():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        with_retries(failing, attempts=3, base_delay=0.01)
    assert len(calls) == calls_expected


def test_persistent_write_failure_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = OutputStore(str(blocker / "out"), {})
    store.attempts = 2
    with pytest.raises(OutputError, match=r"writing .*file/out/_SUCCESS failed \(transient errors retried 2 times\): NotADirectoryError"):
        store.write_json("_SUCCESS", {})
