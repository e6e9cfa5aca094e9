"""The three shard formats read directly (no Ray, no S3): folders, img2dataset WebDataset tars, img2dataset Parquet."""
import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_batch.config import InputConfig
from resnet_batch.errors import InputError
from resnet_batch.embed.listing import Shard, detect_format, tar_key
from tests.helpers.shards import list_shards
from resnet_batch.embed.reader import (WDS_FIELDS, ReadSettings, check_passthrough_names, coerce_json_value,
                                 json_field_types, passthrough_fields, read_shard)
from resnet_batch.dev.sample_data import IMG2DATASET_META, write_image_parquet, write_webdataset
from resnet_batch.schema import CONTROL_END, PASSTHROUGH_PREFIX
from resnet_batch.storage import display_path, filesystem


@pytest.fixture(scope="module")
def photo_list(photos):
    return sorted(photos.rglob("*.jpg"))


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory, photos, photo_list):
    out = tmp_path_factory.mktemp("wds")
    write_webdataset(photo_list, photos, out, per_shard=10)
    return out


@pytest.fixture(scope="module")
def pq_dir(tmp_path_factory, photos, photo_list):
    out = tmp_path_factory.mktemp("pq")
    write_image_parquet(photo_list, photos, out, per_shard=20, failed_per_shard=2)
    return out


def fields_of(cfg: InputConfig, fmt: str, shards: list[Shard]) -> list[pa.Field]:
    """The pass-through output columns, from the first shard file (as the runner does)."""
    check_passthrough_names(cfg.passthrough_columns, fmt)
    if fmt == "folder":
        return []
    fs = filesystem(cfg.uri, {})[0]
    first = shards[0].paths[0]
    return passthrough_fields(fmt, fs, first, cfg.passthrough_columns, cfg.extensions, cfg.image_column,
                              display_path("file", first))


def _read_all(cfg: InputConfig, chunk: int = 4):
    """All image rows of all shards (bytes kept: no decoding) and {shard: (images, skipped)} from the end rows."""
    fmt, listing, shards, skipped = list_shards(cfg)
    extra = fields_of(cfg, fmt, shards)
    settings = ReadSettings(listing.root, listing.protocol, cfg.uri, {}, cfg.extensions, cfg.image_column,
                            tuple(extra), cfg.max_bytes, cfg.images_per_shard, chunk, 5.0, decode=lambda t: t)
    rows, ends = [], {}
    for shard in shards:
        n = 0
        for table in read_shard(shard, settings):
            for r in table.to_pylist():
                r.update({k[len(PASSTHROUGH_PREFIX):]: v for k, v in r.items() if k.startswith(PASSTHROUGH_PREFIX)})
                if r["status"] == CONTROL_END:
                    ends[r["_shard"]] = (n, r["_skipped"])
                else:
                    rows.append(r)
                    n += 1
    return rows, ends, extra


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_tar_key_splits_at_the_first_dot():
    assert tar_key("000010003.jpg") == ("000010003", "jpg")
    assert tar_key("dir/a.b.seg.png") == ("dir/a", "b.seg.png")
    assert tar_key("KEY.JSON") == ("KEY", "json")


@pytest.mark.parametrize("names, fmt", [
    (["00000.tar", "00000.parquet", "00000_stats.json"], "webdataset"),  # img2dataset webdataset output
    (["00000.parquet", "00000_stats.json", "00001.parquet"], "parquet"),  # img2dataset parquet output
    (["a/x.jpg", "a/y.png", "meta.parquet"], "folder"),  # images beside a parquet file: a folder
    (["s.tgz"], "webdataset"), (["s.tar.gz"], "webdataset"),
])
def test_format_detection(names, fmt):
    assert detect_format(names, ("jpg", "png")) == fmt


def test_webdataset_listing_and_rows(wds_dir, photo_list):
    cfg = InputConfig(uri=str(wds_dir))
    fmt, listing, shards, skipped = list_shards(cfg)
    assert fmt == "webdataset"
    assert [s.kind for s in shards] == ["webdataset"] * 4
    assert [s.paths[0].rsplit("/", 1)[-1] for s in shards] == [f"0000{i}.tar" for i in range(4)]
    # img2dataset's sidecar metadata files are listed and skipped, not read as shards
    assert sorted(skipped.examples) == sorted([f"0000{i}.parquet" for i in range(4)] +
                                              [f"0000{i}_stats.json" for i in range(4)])
    assert skipped.count == 8
    rows, ends, extra = _read_all(cfg)
    assert extra == list(WDS_FIELDS)
    assert ends == {0: (10, 0), 1: (10, 0), 2: (10, 0), 3: (6, 0)}
    assert len(rows) == 36
    # image_id = tar path relative to the input root + the sample key
    assert rows[0]["image_id"] == "00000.tar/000000000" and rows[-1]["image_id"] == "00003.tar/000030005"
    assert rows[0]["path"] == f"{wds_dir}/00000.tar#000000000.jpg"
    by_sha = {_sha(p.read_bytes()): p for p in photo_list}
    for r in rows:
        meta = json.loads(r["json"])
        assert _sha(r["bytes"]) == meta["sha256"] and meta["sha256"] in by_sha
        assert r["caption"] == meta["caption"] == f"a photo of {by_sha[meta['sha256']].stem.rsplit('-', 1)[0]}"
        assert r["status"] == "ok" and r["error"] is None


def test_webdataset_json_fields_become_typed_columns(wds_dir):
    cfg = InputConfig(uri=str(wds_dir),
                      passthrough_columns=("url", "original_width", "original_height", "sha256", "error_message"))
    rows, _, extra = _read_all(cfg)
    assert [(f.name, f.type) for f in extra] == [
        ("caption", pa.string()), ("json", pa.string()), ("url", pa.string()), ("original_width", pa.int64()),
        ("original_height", pa.int64()), ("sha256", pa.string()), ("error_message", pa.string())]
    for r in rows:
        meta = json.loads(r["json"])
        assert (r["url"], r["original_width"], r["original_height"], r["sha256"]) == \
            (meta["url"], meta["width"], meta["height"], meta["sha256"])
        assert r["error_message"] is None and 500 <= max(r["original_width"], r["original_height"]) <= 800


def test_passthrough_names_must_not_shadow_output_columns(wds_dir, pq_dir):
    for uri, fmt in ((wds_dir, "webdataset"), (pq_dir, "parquet")):
        with pytest.raises(InputError) as err:
            check_passthrough_names(("url", "width", "status"), fmt)
        assert str(err.value) == (
            "input.passthrough_columns ['width', 'status'] clash with output columns of the same name "
            "['image_id', 'path', 'width', 'height', 'topk_ids', 'topk_labels', 'topk_probs', 'embedding', "
            "'status', 'error']")


def test_webdataset_unknown_json_field_is_refused_before_work(wds_dir):
    cfg = InputConfig(uri=str(wds_dir), passthrough_columns=("url", "licence"))
    fmt, _, shards, _ = list_shards(cfg)
    with pytest.raises(InputError) as err:
        fields_of(cfg, fmt, shards)
    assert str(err.value) == (
        f"input.passthrough_columns ['licence'] not found in the json of the first 10 samples of "
        f"{wds_dir}/00000.tar; fields seen: {sorted(IMG2DATASET_META)}")
    with pytest.raises(InputError, match=r"\['caption'\] are always output columns for webdataset input"):
        check_passthrough_names(("caption",), "webdataset")


def test_json_types_are_inferred_and_coerced(tmp_path):
    samples = [{"n": 1, "x": 1, "ok": True, "tags": ["a"], "none": None},
               {"n": 2, "x": 2.5, "ok": False, "tags": [], "none": None}]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate(samples):
            for ext, payload in (("jpg", b"\xff\xd8"), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    fs, _ = filesystem(str(tmp_path), {})
    types, seen, n = json_field_types(fs, str(path), ("n", "x", "ok", "tags", "none"), ("jpg",))
    assert seen == {"n", "x", "ok", "tags", "none"} and n == 2
    assert types == {"n": pa.int64(), "x": pa.float64(), "ok": pa.bool_(), "tags": pa.string(), "none": pa.string()}
    assert coerce_json_value(3, pa.float64()) == 3.0 and coerce_json_value(4.0, pa.int64()) == 4
    assert coerce_json_value("7", pa.int64()) is None and coerce_json_value(True, pa.int64()) is None
    assert coerce_json_value({"b": 1, "a": [2]}, pa.string()) == '{"a": [2], "b": 1}'


def test_damaged_tar_is_one_failed_row_after_the_good_samples(wds_dir, tmp_path):
    data = (wds_dir / "00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])  # ends inside a member: a truncated upload
    cfg = InputConfig(uri=str(tmp_path), format="webdataset")
    rows, ends, _ = _read_all(cfg)
    good = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    assert 1 <= len(good) < 10 and len(bad) == 1
    assert bad[0]["image_id"] == "cut.tar/<unreadable>" and bad[0]["status"] == "read_error"
    assert bad[0]["error"].startswith("tar shard unreadable: ReadError:")
    assert ends[0][0] == len(rows)


def test_parquet_rows_keys_and_passthrough(pq_dir, photo_list):
    cfg = InputConfig(uri=str(pq_dir), passthrough_columns=("url", "caption", "original_width", "sha256"))
    fmt, _, shards, skipped = list_shards(cfg)
    assert fmt == "parquet" and len(shards) == 2
    assert sorted(skipped.examples) == ["00000_stats.json", "00001_stats.json"]
    rows, ends, extra = _read_all(cfg)
    assert [(f.name, f.type) for f in extra] == [("url", pa.string()), ("caption", pa.string()),
                                                 ("original_width", pa.int64()), ("sha256", pa.string())]
    # img2dataset's failed downloads (null image) are counted as skipped, not silently dropped
    assert ends == {0: (20, 2), 1: (16, 2)}
    assert [r["image_id"] for r in rows[:2]] == ["00000.parquet/000000000", "00000.parquet/000000001"]
    assert rows[0]["path"] == f"{pq_dir}/00000.parquet#000000000"
    shas = {_sha(p.read_bytes()) for p in photo_list}
    assert {r["sha256"] for r in rows} == shas
    for r in rows:
        assert _sha(r["bytes"]) == r["sha256"] and r["url"].startswith("https://photos.example.com/shard-")


def test_parquet_image_column_and_missing_columns(tmp_path, photo_list, photos):
    write_image_parquet(photo_list[:3], photos, tmp_path / "a", image_column="image")
    cfg = InputConfig(uri=str(tmp_path / "a"))
    fmt, _, shards, _ = list_shards(cfg)
    with pytest.raises(InputError) as err:
        fields_of(cfg, fmt, shards)
    assert str(err.value) == (f"{tmp_path}/a/00000.parquet has no image column 'jpg' (input.image_column); "
                              f"columns: {list(IMG2DATASET_META) + ['image']}")
    with pytest.raises(InputError, match=r"input.passthrough_columns \['licence'\] not in"):
        fields_of(InputConfig(uri=str(tmp_path / "a"), image_column="image", passthrough_columns=("licence",)),
                  fmt, shards)
    # A later shard without a pass-through column gives nulls; one without the image column gives failed rows.
    pq.write_table(pa.table({"key": ["k1"], "image": [photo_list[0].read_bytes()]}), tmp_path / "a" / "00001.parquet")
    pq.write_table(pa.table({"key": ["k2"], "img": [photo_list[1].read_bytes()]}), tmp_path / "a" / "00002.parquet")
    cfg = InputConfig(uri=str(tmp_path / "a"), image_column="image", passthrough_columns=("url",))
    rows, ends, _ = _read_all(cfg)
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["00001.parquet/k1"]["url"] is None and by_id["00001.parquet/k1"]["status"] == "ok"
    assert by_id["00002.parquet/k2"]["status"] == "read_error"  # its key column is still read
    assert by_id["00002.parquet/k2"]["error"].endswith("has no image column 'image' (input.image_column); "
                                                             "columns: ['key', 'img']")
    assert ends == {0: (3, 0), 1: (1, 0), 2: (1, 0)}


def test_hugging_face_image_struct_column(tmp_path, photo_list):
    data = photo_list[0].read_bytes()
    image = pa.array([{"bytes": data, "path": "a.jpg"}, {"bytes": None, "path": None}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "label": [3, 4]}), tmp_path / "train-00000.parquet")
    cfg = InputConfig(uri=str(tmp_path), image_column="image", passthrough_columns=("label",))
    rows, ends, _ = _read_all(cfg)
    assert [(r["image_id"], r["label"], r["bytes"] == data) for r in rows] == [("train-00000.parquet/000000000", 3, True)]
    assert ends == {0: (1, 1)}


def test_folder_shards_and_ids(photos):
    cfg = InputConfig(uri=str(photos), images_per_shard=10)
    fmt, _, shards, _ = list_shards(cfg)
    assert fmt == "folder" and sum(len(s.paths) for s in shards) == 36
    assert [len(s.paths) for s in shards] == [10, 10, 10, 6]
    rows, ends, _ = _read_all(cfg)
    assert [r["image_id"] for r in rows] == sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    assert ends == {0: (10, 0), 1: (10, 0), 2: (10, 0), 3: (6, 0)}
    with pytest.raises(InputError, match="passthrough_columns applies to webdataset and parquet input only"):
        check_passthrough_names(("x",), "folder")


def test_container_chunks_and_retry_merges(wds_dir):
    """A tar is cut into chunks of images_per_shard; --retry-failed reads only the failed ids, each tagged with
    the chunk whose part holds it."""
    cfg = InputConfig(uri=str(wds_dir), images_per_shard=4)
    fmt, listing, shards, _ = list_shards(cfg)
    settings = ReadSettings(listing.root, listing.protocol, cfg.uri, {}, cfg.extensions, cfg.image_column,
                            tuple(WDS_FIELDS), cfg.max_bytes, 4, 2, 5.0, decode=lambda t: t)
    tables = list(read_shard(shards[1], settings))
    chunks = [sorted(set(t.column("_chunk").to_pylist())) for t in tables]
    assert chunks == [[0], [1], [2]] and [len(t) for t in tables] == [4, 4, 3]  # 10 images + the end row
    assert tables[-1].column("_chunks").to_pylist()[-1] == 3
    only = {"00001.tar/000010003": 0, "00001.tar/000010007": 1}
    merged = list(read_shard(Shard(1, "webdataset", shards[1].paths, only=only), settings))
    ids = {r["image_id"]: r["_chunk"] for t in merged for r in t.to_pylist() if r["status"] != CONTROL_END}
    assert ids == only and all(t.column("_merge").to_pylist()[0] for t in merged)
    assert [t.column("_groups").to_pylist()[0] for t in merged] == [2, 2]


def test_single_shard_uri(wds_dir):
    fmt, listing, shards, _ = list_shards(InputConfig(uri=str(wds_dir / "00002.tar")))
    assert fmt == "webdataset" and [s.paths for s in shards] == [(f"{wds_dir}/00002.tar",)]
    assert isinstance(shards[0], Shard) and listing.root == str(wds_dir)
