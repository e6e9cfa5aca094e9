"""S3 storage against a real SeaweedFS server (keys checked): options, credentials, preflight errors, listing, writes."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from resnet_batch.config import InputConfig, build_config, redacted
from resnet_batch.errors import InputError
from resnet_batch.embed.listing import list_entries
from tests.helpers.shards import list_shards
from resnet_batch.schema import embedding_array, output_schema
from resnet_batch.storage import (StorageOptionsError, filesystem, prepare,
                                  resolve_options)
from resnet_batch.errors import OutputError
from resnet_batch.output.store import encode_part, write_file
from tests.helpers.jobs import REPO
from tests.helpers.s3server import ACCESS_KEY, REGION, SECRET_KEY, free_ports

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3(s3_server, photos):
    """The server with: a private bucket of photos, a public-read copy, an empty output bucket."""
    s3_server.make_bucket("storage-private")
    s3_server.make_bucket("storage-public", public_read=True)
    s3_server.make_bucket("storage-out")
    s3_server.upload_dir(photos, "storage-private/photos")
    s3_server.upload_dir(photos, "storage-public/photos")
    return s3_server


@pytest.fixture
def clean_env(monkeypatch):
    """No AWS settings from the machine; s3fs's instance cache emptied so the environment is read afresh."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def _cfg(input_uri, output_uri, input_options, output_options=None):
    return build_config({"input": {"uri": input_uri, "storage_options": input_options},
                         "output": {"uri": output_uri, "storage_options": output_options or {}}})


def _objects(s3, prefix):
    return s3.filesystem().find(prefix)


# -- options ------------------------------------------------------------------------------------
def test_resolve_options_aliases_and_environment():
    env = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-3",
           "AWS_SECRET_ACCESS_KEY": "from-env"}
    assert resolve_options("s3://b/p", {}, env=env) == {"endpoint_url": "http://minio:9000",
                                                        "client_kwargs": {"region_name": "eu-west-3"}}
    # the config wins over the environment; `region` is client_kwargs.region_name; credentials are never copied
    opts = resolve_options("s3://b/p", {"endpoint_url": "http://seaweed:8333", "region": "us-east-2"}, env=env)
    assert opts == {"endpoint_url": "http://seaweed:8333", "client_kwargs": {"region_name": "us-east-2"}}
    assert resolve_options("s3://b/p", opts, env=env) == opts  # idempotent (driver, then each worker)
    assert resolve_options("s3://b/p", {}, env={"AWS_ENDPOINT_URL_S3": "http://a", "AWS_ENDPOINT_URL": "http://b"}) \
        == {"endpoint_url": "http://a"}
    assert resolve_options("/data/photos", {"anything": 1}, env=env) == {"anything": 1}  # other protocols untouched


def test_unknown_or_conflicting_s3_options_are_named():
    with pytest.raises(StorageOptionsError) as err:
        resolve_options("s3://b/p", {"region_name": "x", "secret_key": "s3cr3t-value"}, where="input.storage_options")
    assert str(err.value) == ("input.storage_options: unknown option(s) ['region_name', 'secret_key'] for s3://b/p; "
                              "s3 options are e.g. endpoint_url, region, anon, key, secret, token, profile, "
                              "client_kwargs, config_kwargs")
    assert "s3cr3t-value" not in str(err.value)  # keys are named, values never shown
    with pytest.raises(StorageOptionsError, match="region 'a' and client_kwargs.region_name 'b' disagree"):
        resolve_options("s3://b/p", {"region": "a", "client_kwargs": {"region_name": "b"}})
    with pytest.raises(InputError, match=r"input.storage_options: unknown option\(s\) \['endpoint'\]"):
        prepare(_cfg("s3://b/p", "/tmp/out", {"endpoint": "http://x"}))


def test_secrets_are_masked_in_reports_and_repr():
    cfg = _cfg("s3://b/p", "s3://o/p", {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": "http://e:1",
                                        "anon": False, "client_kwargs": {"aws_session_token": "tok-123",
                                                                         "region_name": REGION}},
               {"profile": "photos", "token": "tok-456"})
    red = redacted(cfg)
    assert red["input"]["storage_options"] == {
        "key": "***", "secret": "***", "endpoint_url": "http://e:1", "anon": False,
        "client_kwargs": {"aws_session_token": "***", "region_name": REGION}}
    assert red["output"]["storage_options"] == {"profile": "photos", "token": "***"}
    for text in (repr(cfg), str(cfg), repr(cfg.input), repr(cfg.output)):
        assert SECRET_KEY not in text and "tok-123" not in text and "tok-456" not in text


# -- credentials from the usual places ---------------------------------------------------------------
def test_credentials_and_endpoint_from_aws_environment(s3, clean_env):
    clean_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    clean_env.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    clean_env.setenv("AWS_REGION", REGION)
    cfg = prepare(_cfg("s3://storage-private/photos", "s3://storage-out/env", {}))
    assert cfg.input.storage_options == {"endpoint_url": s3.endpoint, "client_kwargs": {"region_name": REGION}}
    fmt, listing, shards, _ = list_shards(cfg.input)
    assert sum(len(s.paths) for s in shards) == 36 and listing.protocol == "s3"


def test_credentials_from_an_aws_profile(s3, clean_env, tmp_path):
    (tmp_path / "credentials").write_text(f"[photos]\naws_access_key_id = {ACCESS_KEY}\n"
                                          f"aws_secret_access_key = {SECRET_KEY}\n")
    (tmp_path / "config").write_text(f"[profile photos]\nregion = {REGION}\nendpoint_url = {s3.endpoint}\n")
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    clean_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    clean_env.setenv("AWS_PROFILE", "photos")
    assert _images(prepare(_cfg("s3://storage-private/photos", "/tmp/x", {})).input) == 36
    # or named in the config
    clean_env.delenv("AWS_PROFILE")
    cfg = prepare(_cfg("s3://storage-private/photos", "/tmp/x", {"profile": "photos"}))
    assert _images(cfg.input) == 36


def test_anonymous_read_of_a_public_read_bucket(s3, clean_env):
    anon = {"anon": True, "endpoint_url": s3.endpoint}
    cfg = prepare(_cfg("s3://storage-public/photos", "/tmp/x", anon))
    _, _, shards, _ = list_shards(cfg.input)
    assert sum(len(s.paths) for s in shards) == 36
    fs, _ = filesystem(cfg.input.uri, cfg.input.storage_options)
    assert fs.cat_file(shards[0].paths[0])[:2] == b"\xff\xd8"  # a JPEG, read without credentials
    with pytest.raises(InputError) as err:  # the private bucket refuses anonymous requests
        prepare(_cfg("s3://storage-private/photos", "/tmp/x", anon))
    assert str(err.value) == (f"input s3://storage-private/photos: access denied at {s3.endpoint} "
                              "(AccessDenied: Access Denied.)")
    with pytest.raises(OutputError, match=r"output s3://storage-public/out: access denied .*AccessDenied"):
        prepare(_cfg("s3://storage-public/photos", "s3://storage-public/out", anon, anon))  # public-read only


# -- preflight: clear errors before any work -------------------------------------------------------
def test_wrong_secret(s3):
    good, bad = s3.storage_options(), s3.storage_options(secret="not-the-secret")
    with pytest.raises(InputError) as err:
        prepare(_cfg("s3://storage-private/photos", "s3://storage-out/x", bad, good))
    assert str(err.value) == (f"input s3://storage-private/photos: the secret key was rejected at {s3.endpoint} "
                              "(SignatureDoesNotMatch); check input.storage_options.secret, AWS_SECRET_ACCESS_KEY "
                              "or the AWS profile")
    with pytest.raises(OutputError) as err:
        prepare(_cfg("s3://storage-private/photos", "s3://storage-out/x", good, bad))
    assert str(err.value).startswith(f"output s3://storage-out/x: the secret key was rejected at {s3.endpoint} "
                                     "(SignatureDoesNotMatch); check output.storage_options.secret")
    assert _objects(s3, "storage-out/x") == []


def test_unknown_access_key(s3):
    opts = {**s3.storage_options(), "key": "AKIDNOBODY"}
    with pytest.raises(InputError) as err:
        prepare(_cfg("s3://storage-private/photos", "/tmp/x", opts))
    assert str(err.value) == (f"input s3://storage-private/photos: the access key is not valid at {s3.endpoint} "
                              "(InvalidAccessKeyId); check input.storage_options.key, AWS_ACCESS_KEY_ID / "
                              "AWS_SESSION_TOKEN or the AWS profile")


def test_missing_bucket_or_prefix(s3):
    opts = s3.storage_options()
    with pytest.raises(InputError) as err:
        prepare(_cfg("s3://no-such-bucket/photos", "s3://storage-out/y", opts, opts))
    assert str(err.value) == f"input s3://no-such-bucket/photos: bucket 'no-such-bucket' does not exist at {s3.endpoint}"
    with pytest.raises(OutputError) as err:
        prepare(_cfg("s3://storage-private/photos", "s3://no-such-out/y", opts, opts))
    assert str(err.value) == f"output s3://no-such-out/y: bucket 'no-such-out' does not exist at {s3.endpoint}"
    with pytest.raises(InputError) as err:
        prepare(_cfg("s3://storage-private/nothing-here", "s3://storage-out/y", opts, opts))
    assert str(err.value) == (f"input not found: s3://storage-private/nothing-here (input.uri): no objects under "
                              f"this prefix at {s3.endpoint}")
    # the write check leaves nothing behind
    assert _objects(s3, "storage-out/y") == []


def test_unreachable_endpoint_fails_fast():
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    opts = {"endpoint_url": endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err:
        prepare(_cfg("s3://photos/in", "/tmp/x", opts))
    assert time.perf_counter() - t0 < 20
    assert str(err.value).startswith(f"input s3://photos/in: cannot reach the S3 endpoint {endpoint} "
                                     f"(Could not connect to the endpoint URL: \"{endpoint}/photos?")
    assert str(err.value).endswith("check input.storage_options.endpoint_url or AWS_ENDPOINT_URL")


def test_cli_wrong_secret_exits_2_before_ray_starts(s3, tmp_path, checkpoint):
    """The command line: the secret from the environment, a clear message, exit code 2, no Ray, no output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY="wrong-secret", AWS_ENDPOINT_URL=s3.endpoint,
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "resnet_batch.cli", "embed", "--input", "s3://storage-private/photos",
                           "--output", "s3://storage-out/cli", "-o", f"model.weights={checkpoint}"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"error: input s3://storage-private/photos: the secret key was rejected at {s3.endpoint} "
        "(SignatureDoesNotMatch); check input.storage_options.secret, AWS_SECRET_ACCESS_KEY or the AWS profile")
    assert proc.stdout == ""
    assert _objects(s3, "storage-out/cli") == []


# -- listing -------------------------------------------------------------------------------------
def test_listing_walks_prefixes_level_by_level_in_pages(s3):
    """Objects at the root and in sub-prefixes: one delimiter listing per prefix (pages of 1000, sub-prefixes
    listed concurrently), never a request per object; every page arrives with size and ETag."""
    fs = s3.filesystem()
    s3.make_bucket("storage-listing")
    layout = {f"storage-listing/set/top-{i}.jpg": b"x" for i in range(3)}
    layout.update({f"storage-listing/set/a/{i:04d}.jpg": b"xy" for i in range(1100)})
    layout.update({f"storage-listing/set/b/deep/{i}.jpg": b"x" for i in range(5)})
    layout["storage-listing/set-other/not-me.jpg"] = b"x"  # shares the prefix string, not the folder
    fs.pipe(layout)
    listing = list_entries(InputConfig(uri="s3://storage-listing/set", storage_options=s3.storage_options()))
    lister, _ = filesystem("s3://storage-listing/set", s3.storage_options())
    calls = []
    lister.s3.meta.events.register("before-parameter-build.s3.ListObjectsV2",
                                   lambda params, **kw: calls.append(dict(params)))
    pages = list(listing.pages)
    found = {p.decode(): (size, etag) for page in pages for p, size, etag in
             zip(page.column("path").to_pylist(), page.column("size").to_pylist(), page.column("etag").to_pylist())}
    assert sorted(found) == sorted(k.split("/", 2)[2] for k in layout if k.startswith("storage-listing/set/"))
    assert found["a/0001.jpg"][0] == 2 and len(found["a/0001.jpg"][1]) == 32  # size and MD5 ETag (hex)
    assert sorted((c["Prefix"], c.get("Delimiter")) for c in calls) == [
        ("set/", "/"), ("set/a/", "/"), ("set/a/", "/"), ("set/b/", "/"), ("set/b/deep/", "/")]
    assert max(len(p) for p in pages) == 1000


def test_shards_on_s3_match_local(s3, photos):
    cfg = InputConfig(uri="s3://storage-private/photos", storage_options=s3.storage_options(), images_per_shard=8)
    fmt, listing, shards, _ = list_shards(cfg)
    _, _, local, _ = list_shards(InputConfig(uri=str(photos), images_per_shard=8))
    assert listing.root == "storage-private/photos" and fmt == "folder"
    rel = sorted(p.split("/photos/", 1)[1] for s in shards for p in s.paths)
    assert rel == sorted(os.path.relpath(p, photos) for s in local for p in s.paths)
    assert sorted(len(s.paths) for s in shards) == sorted(len(s.paths) for s in local)


# -- output --------------------------------------------------------------------------------------
def test_output_objects_are_never_visible_partially(s3):
    """A 24 MB part written while another client polls the prefix: it is either absent or complete."""
    n = 3000
    schema = output_schema()
    rng = np.random.default_rng(0)
    table = pa.table({
        "image_id": [f"img-{i:05d}" for i in range(n)], "path": [f"p/{i}" for i in range(n)],
        "width": pa.array(np.full(n, 640), pa.int32()), "height": pa.array(np.full(n, 480), pa.int32()),
        "topk_ids": pa.array([[1, 2]] * n, pa.list_(pa.int32())), "topk_labels": pa.array([["a", "b"]] * n),
        "topk_probs": pa.array([[0.6, 0.4]] * n, pa.list_(pa.float32())),
        "embedding": embedding_array(rng.standard_normal((n, 2048)).astype(np.float32), np.ones(n, bool)),
        "status": ["ok"] * n, "error": pa.array([None] * n, pa.string())})
    seen, stop = [], threading.Event()
    watcher = s3.filesystem()

    def poll():
        while not stop.is_set():
            for info in watcher.ls("storage-out/atomic", detail=True, refresh=True) if watcher.exists(
                    "storage-out/atomic") else []:
                seen.append((info["name"], info["size"]))
            time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    fs, root = filesystem("s3://storage-out/atomic", s3.storage_options())
    try:
        write_file(fs, f"{root}/part-000000.parquet", encode_part(table, schema, {"rows": n}, "zstd", "n", 1), 30)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    final = watcher.info("storage-out/atomic/part-000000.parquet")["size"]
    assert final > 20_000_000
    assert seen and {size for name, size in seen if name.endswith("part-000000.parquet")} == {final}
    with fs.open(f"{root}/part-000000.parquet", "rb") as f:
        assert pq.read_table(f, columns=["image_id"]).num_rows == n


def test_local_paths_are_checked_too(tmp_path, photos):
    with pytest.raises(InputError) as err:
        prepare(_cfg(str(tmp_path / "missing"), str(tmp_path / "out"), {}))
    assert str(err.value) == f"input not found: {tmp_path / 'missing'} (input.uri)"
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(OutputError) as err:
        prepare(_cfg(str(photos), str(tmp_path / "blocker" / "out"), {}))
    assert str(err.value) == f"output {tmp_path / 'blocker' / 'out'}: {tmp_path / 'blocker'} is a file, not a folder " \
                             "(output.uri)"
    cfg = prepare(_cfg(str(photos), str(tmp_path / "new" / "out"), {}))
    assert cfg.input.storage_options == {} and not (tmp_path / "new").exists()  # checked, nothing created


def _images(cfg_input) -> int:
    return sum(len(shard.paths) for shard in list_shards(cfg_input)[2])
