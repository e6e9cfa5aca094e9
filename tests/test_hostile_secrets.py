"""Secrets in the configuration never reach what the job writes or prints.

The rules (resnet_batch/redact.py) are tested on their own first; then the real embed job runs with a
secret in every place a user can put one (a pre-signed weights URL served by a real HTTP server that
checks its token, an Authorization header, S3 keys and a proxy password for a real SeaweedFS output)
and every object it wrote, the index built from it, the console and Ray's logs are searched for each.
"""
import json
import re
from pathlib import Path

import pytest
import yaml

from resnet_batch.config import ConfigError, apply_overrides, build_config, load_config, redacted
from resnet_batch.errors import WeightsError
from resnet_batch.redact import MASK, redact_options, redact_text, safe_uri
from resnet_batch.storage import explain

# Distinctive, so that a search for each one over every output is meaningful.
TOKEN = "sessiontoken-5e1f0a"
SIGNATURE = "f00dfacesignature77"
BEARER = "bearer-credential-c4b3"
PROXY_PASSWORD = "proxy-password-71d2"
ENDPOINT_PASSWORD = "endpoint-password-0b9e"
ACCOUNT_KEY = "accountkey-ab12+/cd=="
FTP_PASSWORD = "ftp-password-3a7c"


def presigned(url: str) -> str:
    """A pre-signed-looking URL: the credential scope, the session token and the signature in the query."""
    return (f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20260101%2Fus-east-1%2Fs3"
            f"%2Faws4_request&X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIGNATURE}&X-Amz-Expires=3600")


# -- the rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri,safe", [
    (presigned("https://models.example.com/r50.pth"), "https://models.example.com/r50.pth"),
    (f"ftp://photos:{FTP_PASSWORD}@ftp.example.com:2121/2026/#part", "ftp://ftp.example.com:2121/2026/"),
    ("s3://bucket/weights.pth?versionId=3", "s3://bucket/weights.pth"),
    (f"simplecache::https://user:{FTP_PASSWORD}@h/w.pth?token={TOKEN}", "simplecache::https://h/w.pth"),
    ("/models/r50.pth", "/models/r50.pth"),
    ("IMAGENET1K_V2", "IMAGENET1K_V2"),
])
def test_safe_uri_keeps_where_and_drops_userinfo_query_and_fragment(uri, safe):
    assert safe_uri(uri) == safe


def test_text_is_redacted_by_the_shape_of_its_secrets():
    assert redact_text(presigned("https://h/w.pth")) == (
        "https://h/w.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Security-Token=***"
        "&X-Amz-Signature=***&X-Amz-Expires=3600")
    assert redact_text(f"could not connect to http://admin:{ENDPOINT_PASSWORD}@10.0.0.1:9000/b") == \
        "could not connect to http://***@10.0.0.1:9000/b"
    assert redact_text(f"DefaultEndpointsProtocol=https;AccountName=photos;AccountKey={ACCOUNT_KEY};"
                       "EndpointSuffix=core.windows.net") == \
        "DefaultEndpointsProtocol=https;AccountName=photos;AccountKey=***;EndpointSuffix=core.windows.net"
    assert redact_text(f"Authorization: Bearer {BEARER}, then Basic dXNlcjpwYXNz") == \
        "Authorization: Bearer ***, then Basic ***"
    assert redact_text(f"{{'token': '{TOKEN}', 'region': 'eu'}}") == "{'token': '***', 'region': 'eu'}"
    assert redact_text("passthrough_columns=url, ExpiredToken: the token has expired") == \
        "passthrough_columns=url, ExpiredToken: the token has expired"  # no secret: nothing masked


def test_storage_options_are_redacted_by_key_and_by_value():
    options = {
        "key": "AKIDEXAMPLE", "secret": "s3cr3t", "anon": False, "profile": "prod",
        "endpoint_url": f"http://minio:{ENDPOINT_PASSWORD}@10.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1", "headers": {"Authorization": f"Bearer {BEARER}",
                                                                  "X-Forwarded": f"Bearer {BEARER}"}},
        "config_kwargs": {"proxies": {"https": f"http://proxy:{PROXY_PASSWORD}@proxy.corp:3128"}},
        "connection_string": f"AccountName=photos;AccountKey={ACCOUNT_KEY}",
        "mirrors": [f"https://u:{FTP_PASSWORD}@m1.example.com", "https://m2.example.com"],
    }
    assert redact_options(options) == {
        "key": MASK, "secret": MASK, "anon": False, "profile": "prod",
        "endpoint_url": "http://***@10.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1", "headers": {"Authorization": MASK, "X-Forwarded": "Bearer ***"}},
        "config_kwargs": {"proxies": {"https": "http://***@proxy.corp:3128"}},
        "connection_string": MASK,
        "mirrors": ["https://***@m1.example.com", "https://m2.example.com"],
    }


def test_redacted_config_records_safe_uris_and_no_secret():
    cfg = build_config({
        "input": {"uri": f"ftp://photos:{FTP_PASSWORD}@ftp.example.com/2026", "storage_options": {
            "password": FTP_PASSWORD, "client_kwargs": {"headers": {"Authorization": f"Bearer {BEARER}"}}}},
        "model": {"weights": presigned("https://models.example.com/r50.pth")},
        "compute": {"ray_address": f"ray://ops:{PROXY_PASSWORD}@head:10001"},
        "output": {"uri": "s3://embeddings/2026", "storage_options": {
            "endpoint_url": f"http://minio:{ENDPOINT_PASSWORD}@10.0.0.1:9000",
            "config_kwargs": {"proxies": {"https": f"http://p:{PROXY_PASSWORD}@proxy:3128"}}}},
    })
    red = redacted(cfg)
    assert red["input"]["uri"] == "ftp://ftp.example.com/2026"
    assert red["model"]["weights"] == "https://models.example.com/r50.pth"
    assert red["compute"]["ray_address"] == "ray://***@head:10001"
    assert red["input"]["storage_options"] == {"password": MASK, "client_kwargs": {"headers": {"Authorization": MASK}}}
    assert red["output"]["storage_options"]["endpoint_url"] == "http://***@10.0.0.1:9000"
    assert red["model"]["precision"] == cfg.model.precision and red["input"]["extensions"] == list(cfg.input.extensions)
    text = json.dumps(red)
    for secret in (FTP_PASSWORD, BEARER, TOKEN, SIGNATURE, PROXY_PASSWORD, ENDPOINT_PASSWORD):
        assert secret not in text


def test_a_config_without_secrets_is_reported_as_it_is():
    cfg = build_config({"input": {"uri": "s3://photos/2026", "passthrough_columns": ["url", "key_points"],
                                  "storage_options": {"anon": True, "endpoint_url": "http://10.0.0.1:9000"}},
                        "model": {"weights": "/models/r50.pth"}, "output": {"uri": "/data/embeddings"}})
    assert redacted(cfg) == cfg.model_dump(mode="json")  # no key of the config itself reads as a secret


def test_config_errors_do_not_echo_secrets(tmp_path):
    base = {"input": {"uri": "photos"}, "output": {"uri": "out"}}
    with pytest.raises(ConfigError) as err:  # a mapping expected: the string holds the secret
        build_config({**base, "input": {"uri": "p", "storage_options": f"AccountKey={ACCOUNT_KEY}"}})
    assert str(err.value) == ("invalid config: 'input.storage_options': Input should be a valid dictionary "
                              "(got '***')")
    with pytest.raises(ConfigError) as err:  # a string expected: the list holds a pre-signed URL
        build_config({**base, "model": {"weights": [presigned("https://h/w.pth")]}})
    assert "X-Amz-Security-Token=***" in str(err.value) and TOKEN not in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config({**base, "compute": {"ray_address": 7, "batch_size": f"http://u:{PROXY_PASSWORD}@h"}})
    assert "(got 'http://***@h')" in str(err.value) and PROXY_PASSWORD not in str(err.value)

    bad_yaml = tmp_path / "bad.yaml"  # PyYAML quotes the offending line: the message must not
    bad_yaml.write_text(f"input: {{uri: photos}}\noutput:\n  uri: out\n  storage_options: {{secret: {BEARER}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad_yaml)
    assert str(err.value).startswith(f"config file {bad_yaml} is not valid YAML: ") and BEARER not in str(err.value)
    assert "line 5, column 1" in str(err.value)

    with pytest.raises(ConfigError) as err:  # an override typed YAML-style, without '='
        apply_overrides({}, [f"input.storage_options.secret: {BEARER}"])
    assert str(err.value) == "override 'input.storage_options.secret'... is not of the form section.key=value"
    with pytest.raises(ConfigError) as err:
        apply_overrides({"input": {"uri": "p"}}, [f"input.uri.password={BEARER}"])
    assert str(err.value) == "override 'input.uri.password': 'uri' is not a section"


def test_storage_errors_are_explained_without_secrets():
    from botocore.exceptions import ClientError, EndpointConnectionError

    endpoint = f"http://minio:{ENDPOINT_PASSWORD}@10.0.0.1:9000"
    err = EndpointConnectionError(endpoint_url=f"{endpoint}/bucket?list-type=2")
    assert explain(err, "s3://bucket/photos", "input", endpoint) == (
        "input s3://bucket/photos: cannot reach the S3 endpoint http://***@10.0.0.1:9000 (Could not connect to the "
        "endpoint URL: \"http://***@10.0.0.1:9000/bucket?list-type=2\"); check input.storage_options.endpoint_url "
        "or AWS_ENDPOINT_URL")
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": f"denied for {presigned('https://h/k')}"}},
                         "GetObject")
    message = explain(denied, f"s3://u:{FTP_PASSWORD}@bucket/photos", "input", endpoint)
    assert message.startswith("input s3://***@bucket/photos: access denied at http://***@10.0.0.1:9000 (AccessDenied")
    for secret in (ENDPOINT_PASSWORD, TOKEN, SIGNATURE, FTP_PASSWORD):
        assert secret not in message


# -- the real job ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights_server(checkpoint):
    """The checkpoint behind a real HTTP server that wants the pre-signed query and the bearer header."""
    from tests.helpers.httpserver import FileServer

    with FileServer({"/models/r50.pth": checkpoint.read_bytes()},
                    query={"X-Amz-Security-Token": TOKEN, "X-Amz-Signature": SIGNATURE},
                    headers={"Authorization": f"Bearer {BEARER}"}) as server:
        yield server


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.make_bucket("hostile-out")


def _secrets_in(data: bytes) -> list[str]:
    from tests.helpers.s3server import SECRET_KEY

    return [s for s in (TOKEN, SIGNATURE, BEARER, PROXY_PASSWORD, ENDPOINT_PASSWORD, SECRET_KEY) if s.encode() in data]


def _write_config(path: Path, photos: Path, weights: str, output: str, output_options: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "input": {"uri": str(photos), "images_per_shard": 3,
                  "storage_options": {"client_kwargs": {"headers": {"Authorization": f"Bearer {BEARER}"}}}},
        "model": {"weights": weights, "precision": "fp32",  # a checkpoint URL gets its own credentials
                  "storage_options": {"client_kwargs": {"headers": {"Authorization": f"Bearer {BEARER}"}}}},
        "compute": {"batch_size": 8, "decode_batch_size": 4, "torch_threads": 1},
        "output": {"uri": output, "storage_options": output_options},
    }))
    return path


@pytest.mark.s3
@pytest.mark.ray
def test_no_secret_in_anything_the_job_writes_or_prints(tmp_path, photos, weights_server, s3_server, bucket,
                                                        ray_local, capfd):
    from resnet_batch.cli import main
    from resnet_batch.search.index import SimilarityIndex
    from resnet_batch.search.build import build_index
    from resnet_batch.search.similar import QueryEmbedder

    subset = tmp_path / "photos"
    for p in sorted(photos.rglob("*.jpg"))[:6]:
        (subset / p.parent.name).mkdir(parents=True, exist_ok=True)
        (subset / p.parent.name / p.name).write_bytes(p.read_bytes())
    output_options = {**s3_server.storage_options(),  # the S3 secret key, and a proxy with a password
                      "config_kwargs": {"proxies": {"https": f"http://proxy:{PROXY_PASSWORD}@127.0.0.1:9"}}}
    weights = presigned(weights_server.url("/models/r50.pth"))
    config = _write_config(tmp_path / "job.yaml", subset, weights, "s3://hostile-out/run", output_options)
    capfd.readouterr()

    assert main(["embed", "--config", str(config)]) == 0
    assert ("GET", "/models/r50.pth", 200) in weights_server.requests  # fetched with the token and the header
    fs = s3_server.filesystem()
    written = fs.find("hostile-out/run")
    assert len([p for p in written if re.search(r"/part-\d+\.parquet$", p)]) == 2
    assert "hostile-out/run/_run_report.json" in written
    report = json.loads(fs.cat_file("hostile-out/run/_run_report.json"))
    assert report["provenance"]["weights_id"] == f"checkpoint:{weights_server.url('/models/r50.pth')}"
    assert report["config"]["model"]["weights"] == weights_server.url("/models/r50.pth")

    index_uri = "s3://hostile-out/index"
    build_index(["s3://hostile-out/run"], index_uri, storage_options=output_options, log=print)
    written += fs.find("hostile-out/index")
    leaks = {p: _secrets_in(fs.cat_file(p)) for p in written}
    out, err = capfd.readouterr()
    leaks["console"] = _secrets_in((out + err).encode())
    from ray._private import worker

    for log in Path(worker._global_node.get_logs_dir_path()).rglob("*"):
        if log.is_file():
            leaks[str(log)] = _secrets_in(log.read_bytes())
    assert {where: found for where, found in leaks.items() if found} == {}

    # `similar` rebuilds the weights from the index: the recorded URL has no token, so it must be given again
    index = SimilarityIndex.open(index_uri, output_options)
    input_options = {"client_kwargs": {"headers": {"Authorization": f"Bearer {BEARER}"}}}
    with pytest.raises(WeightsError) as refused:
        QueryEmbedder(index.provenance, storage_options=input_options)
    assert 403 in {status for _, _, status in weights_server.requests}  # asked without the token: refused
    assert "pass --weights with the checkpoint's path or full URL" in str(refused.value)
    assert not _secrets_in(str(refused.value).encode())
    QueryEmbedder(index.provenance, weights=weights, storage_options=input_options)  # hash-checked: same weights


@pytest.mark.s3
def test_an_endpoint_password_is_not_echoed_by_a_refused_run(tmp_path, photos, checkpoint, s3_server, bucket,
                                                             capfd):
    from resnet_batch.cli import main

    endpoint = s3_server.endpoint.replace("http://", f"http://minio:{ENDPOINT_PASSWORD}@")
    config = _write_config(tmp_path / "job.yaml", photos, str(checkpoint), "s3://hostile-out/refused",
                           {"endpoint_url": endpoint, "anon": True})
    capfd.readouterr()
    assert main(["embed", "--config", str(config)]) == 2
    out, err = capfd.readouterr()
    assert err.startswith(f"error: output s3://hostile-out/refused: access denied at "
                          f"http://***@127.0.0.1:{s3_server.ports['s3']} ")
    assert _secrets_in((out + err).encode()) == []
    assert s3_server.filesystem().find("hostile-out/refused") == []


def test_redaction_catches_slashes_in_url_credentials_spaced_pairs_and_percent_encoded_tokens():
    from resnet_batch.redact import redact_text, safe_uri

    assert safe_uri("s3://AKIAEXAMPLE:wJalr/XUtnFEMI+K7MDENG@bucket/p") == "s3://bucket/p"
    assert redact_text("copy s3://AKIAEXAMPLE:wJalr/XUtnFEMI@bucket/p failed") == "copy s3://***@bucket/p failed"
    assert redact_text("aws_secret_access_key: wJalr/XUtn") == "aws_secret_access_key: ***"
    assert redact_text("password = hunter2; user = me") == "password = ***; user = me"
    assert redact_text("https://h/p%3FX-Amz-Signature%3Dabc123%26a%3D1") == "https://h/p%3FX-Amz-Signature%3D***%26a%3D1"
    assert redact_text("s3://bucket/a@b.jpg") == "s3://bucket/a@b.jpg"  # an @ in a path is not userinfo
