"""End to end on a real S3 server: photos as folders, WebDataset tars and Parquet shards in SeaweedFS ->
the embed job on local Ray -> Parquet in SeaweedFS, read back and compared with the local-folder run."""
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_batch.embed.listing import InputError
from resnet_batch.embed.runner import run
from resnet_batch.dev.sample_data import write_image_parquet, write_webdataset
from resnet_batch.schema import embeddings_to_numpy, read_provenance
from tests.helpers.jobs import job_config
from tests.helpers.s3server import SECRET_KEY

pytestmark = [pytest.mark.s3, pytest.mark.ray]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


N = 12  # photos: enough for several shards of every kind, few enough for a 2-core machine


@pytest.fixture(scope="module")
def subset(tmp_path_factory, photos) -> Path:
    """The first 12 sample photos (two folders of 6), as a local folder tree."""
    root = tmp_path_factory.mktemp("subset")
    for i, p in enumerate(sorted(photos.rglob("*.jpg"))[:N]):
        dest = root / f"part-{i // 6}" / p.name
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(p.read_bytes())
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory, subset, s3_server):
    """The photos three ways on the server: a folder tree in a public-read bucket, img2dataset WebDataset
    tars (5 + 5 + 2) and img2dataset Parquet files (7 + 5, plus one failed download each).
    Returns sha256 of the image bytes -> the photo's path in the folder tree (its image_id there)."""
    base = tmp_path_factory.mktemp("shards")
    photo_list = sorted(subset.rglob("*.jpg"))
    write_webdataset(photo_list, subset, base / "wds", per_shard=5)
    write_image_parquet(photo_list, subset, base / "pq", per_shard=7, failed_per_shard=1)
    s3_server.make_bucket("e2e-public", public_read=True)
    s3_server.make_bucket("e2e-shards")
    s3_server.make_bucket("e2e-out")
    s3_server.upload_dir(subset, "e2e-public/photos")
    s3_server.upload_dir(base / "wds", "e2e-shards/wds")
    s3_server.upload_dir(base / "pq", "e2e-shards/pq")
    return {_sha(p.read_bytes()): p.relative_to(subset).as_posix() for p in photo_list}


@pytest.fixture(scope="module")
def reference(subset, checkpoint, tmp_path_factory, ray_local) -> dict[str, np.ndarray]:
    """The local-folder run on the same photos (same checkpoint, fp32): image_id -> embedding."""
    out = tmp_path_factory.mktemp("reference") / "out"
    report = run(job_config(subset, out, checkpoint, input={"images_per_shard": 4}), progress=False)
    assert report["counts"]["ok"] == N
    table = pq.read_table(out)
    return dict(zip(table.column("image_id").to_pylist(), embeddings_to_numpy(table.column("embedding"))))


class PartWatcher:
    """Polls the output prefix while a job runs, recording every (object, size) another reader could see."""

    def __init__(self, fs, prefix: str):
        self.fs, self.prefix, self.seen = fs, prefix, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                infos = self.fs.ls(self.prefix, detail=True, refresh=True)
            except FileNotFoundError:
                infos = []
            self.seen += [(i["name"], i["size"]) for i in infos if i["name"].endswith(".parquet")]
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _run_s3(s3_server, checkpoint, input_uri, output_prefix, input_options, **input_keys):
    """Run the job from `input_uri` to s3://e2e-out/<prefix>, watching the output; returns (report, table, fs)."""
    cfg = job_config(input_uri, f"s3://e2e-out/{output_prefix}", checkpoint,
                     input={"storage_options": input_options, "images_per_shard": 4, **input_keys},
                     output={"storage_options": s3_server.storage_options()})
    with PartWatcher(s3_server.filesystem(), f"e2e-out/{output_prefix}") as watcher:
        report = run(cfg, progress=True)
    fs = s3_server.filesystem()
    # readers only ever saw complete parts: every size seen is the part's final size
    final = {p: fs.info(p)["size"] for p in fs.find(f"e2e-out/{output_prefix}") if p.endswith(".parquet")}
    assert {(name, size) for name, size in watcher.seen} <= set(final.items())
    table = pq.read_table(f"e2e-out/{output_prefix}", filesystem=fs)
    return report, table, fs


def _assert_same_embeddings(table: pa.Table, ref_ids: list[str], reference: dict[str, np.ndarray]):
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    got = embeddings_to_numpy(ok.column("embedding"))
    want = np.stack([reference[i] for i in ref_ids])
    # bitwise: same bytes, same decode, fp32 with one torch thread does not depend on batch composition
    np.testing.assert_array_equal(got, want)


def _assert_no_secret(fs, prefix: str):
    for path in fs.find(prefix):
        assert SECRET_KEY.encode() not in fs.cat_file(path), path


def test_folder_input_read_anonymously_from_a_public_bucket(s3_server, shards, reference, checkpoint, capfd):
    report, table, fs = _run_s3(s3_server, checkpoint, "s3://e2e-public/photos", "folder",
                                {"anon": True, "endpoint_url": s3_server.endpoint})
    assert report["complete"] is True and report["output"] == "s3://e2e-out/folder"
    assert report["listing"] == {"tasks": 0}  # a prefix this small is listed by the driver (no listing tasks)
    assert report["counts"] == {"inputs": N, "ok": N, "failed": 0, "skipped": 0, "done_before": 0,
                                "this_run": {"images": N, "ok": N, "failed": 0}}
    assert sorted(fs.ls("e2e-out/folder", detail=False)) == sorted(
        [f"e2e-out/folder/part-{i:06d}.parquet" for i in range(3)] +
        [f"e2e-out/folder/{n}" for n in ("_SUCCESS", "_ledger", "_manifest", "_provenance.json", "_run_report.json",
                                         "_state.json")])
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(shards.values())
    assert table.column("path").to_pylist()[0] == f"s3://e2e-public/photos/{ids[0]}"
    _assert_same_embeddings(table, ids, reference)
    assert read_provenance(table.schema)["weights_id"] == f"checkpoint:{checkpoint}"
    # secrets: masked in the report, absent from every output object and from the job's own output
    saved = json.loads(fs.cat_file("e2e-out/folder/_run_report.json"))
    assert saved["config"]["output"]["storage_options"]["secret"] == "***"
    assert saved["config"]["input"]["storage_options"] == {"anon": True, "endpoint_url": s3_server.endpoint}
    _assert_no_secret(fs, "e2e-out/folder")
    out, err = capfd.readouterr()
    assert SECRET_KEY not in out + err


def test_webdataset_tars_with_json_fields(s3_server, shards, reference, checkpoint):
    report, table, fs = _run_s3(s3_server, checkpoint, "s3://e2e-shards/wds", "wds", s3_server.storage_options(),
                                passthrough_columns=["url", "original_width", "original_height", "sha256"])
    # img2dataset's sidecar metadata (.parquet and _stats.json beside each tar) is counted as skipped
    assert report["complete"] is True
    assert (report["counts"]["ok"], report["counts"]["failed"], report["counts"]["skipped"]) == (N, 0, 6)
    assert sorted(report["skipped_files"]) == sorted([f"0000{i}.parquet" for i in range(3)] +
                                                     [f"0000{i}_stats.json" for i in range(3)])
    names = table.schema.names
    assert names[-6:] == ["caption", "json", "url", "original_width", "original_height", "sha256"]
    assert [table.schema.field(n).type for n in names[-6:]] == [pa.string()] * 3 + [pa.int64()] * 2 + [pa.string()]
    rows = table.to_pylist()
    assert sorted(r["image_id"] for r in rows) == \
        [f"0000{s}.tar/0000{s}{i:04d}" for s, n in enumerate((5, 5, 2)) for i in range(n)]
    for r in rows:
        meta = json.loads(r["json"])
        assert r["caption"] == meta["caption"] and r["url"] == meta["url"] == \
            f"https://photos.example.com/{shards[r['sha256']]}"
        # the json's size is img2dataset's; the output's own width/height are measured by the decoder
        assert (r["original_width"], r["original_height"]) == (meta["width"], meta["height"]) == \
            (r["width"], r["height"])
        assert r["path"] == f"s3://e2e-shards/wds/{r['image_id'].split('/')[0]}#{r['image_id'].split('/')[1]}.jpg"
    _assert_same_embeddings(table, [shards[s] for s in table.column("sha256").to_pylist()], reference)
    _assert_no_secret(fs, "e2e-out/wds")


def test_parquet_shards_with_extra_columns(s3_server, shards, reference, checkpoint):
    report, table, fs = _run_s3(s3_server, checkpoint, "s3://e2e-shards/pq", "pq", s3_server.storage_options(),
                                passthrough_columns=["url", "caption", "original_width", "sha256"])
    # 2 failed downloads (no image bytes) + 2 _stats.json files are skipped, and say so
    assert report["complete"] is True
    assert (report["counts"]["ok"], report["counts"]["failed"], report["counts"]["skipped"]) == (N, 0, 4)
    assert table.schema.names[-4:] == ["url", "caption", "original_width", "sha256"]
    assert table.schema.field("original_width").type == pa.int64()
    rows = table.to_pylist()
    assert sorted(r["image_id"] for r in rows)[:2] == ["00000.parquet/000000000", "00000.parquet/000000001"]
    for r in rows:
        assert r["url"] == f"https://photos.example.com/{shards[r['sha256']]}"
        assert r["caption"].startswith("a photo of ") and r["original_width"] == r["width"]
    _assert_same_embeddings(table, [shards[s] for s in table.column("sha256").to_pylist()], reference)


def test_wrong_secret_fails_before_any_work_and_writes_nothing(s3_server, shards, checkpoint):
    cfg = job_config("s3://e2e-shards/wds", "s3://e2e-out/denied", checkpoint,
                     input={"storage_options": s3_server.storage_options(secret="guessed-wrong")},
                     output={"storage_options": s3_server.storage_options()})
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err:
        run(cfg, progress=False)
    assert time.perf_counter() - t0 < 15
    assert str(err.value) == (f"input s3://e2e-shards/wds: the secret key was rejected at {s3_server.endpoint} "
                              "(SignatureDoesNotMatch); check input.storage_options.secret, AWS_SECRET_ACCESS_KEY "
                              "or the AWS profile")
    assert s3_server.filesystem().find("e2e-out/denied") == []


def test_resume_on_s3_skips_finished_shards(s3_server, shards, checkpoint):
    """A second run over the same S3 output finds every part done and writes nothing new."""
    cfg = job_config("s3://e2e-shards/pq", "s3://e2e-out/pq", checkpoint,
                     input={"storage_options": s3_server.storage_options(), "images_per_shard": 4,
                            "passthrough_columns": ["url", "caption", "original_width", "sha256"]},
                     output={"storage_options": s3_server.storage_options()})
    fs = s3_server.filesystem()
    before = {p: fs.info(p)["ETag"] for p in fs.find("e2e-out/pq") if p.endswith(".parquet")}
    report = run(cfg, progress=False)
    assert report["complete"] is True and report["counts"]["done_before"] == N and report["shards"]["parts_written"] == 0
    assert report["sync"]["unchanged"] == 2 and report["counts"]["this_run"]["images"] == 0
    assert {p: fs.info(p)["ETag"] for p in fs.find("e2e-out/pq") if p.endswith(".parquet")} == before


def test_secret_is_not_in_ray_logs(ray_local):
    """After the S3 runs above (the secret travelled inside the read tasks' config), no Ray log holds it."""
    from ray._private import worker

    logs = Path(worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert SECRET_KEY.encode() not in p.read_bytes(), p
