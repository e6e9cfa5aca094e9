"""Config: typed sections, unknown keys and wrong types rejected by name, overrides, CLI exit codes."""
import subprocess
import sys

import pytest

from resnet_batch.config import ConfigError, apply_overrides, build_config, load_config, redacted

BASE = {"input": {"uri": "photos"}, "output": {"uri": "out"}}


def test_defaults_and_sections():
    cfg = build_config(BASE)
    assert cfg.model.weights == "IMAGENET1K_V2"
    assert cfg.model.precision == "bf16"
    assert cfg.compute.batch_size == 32
    assert cfg.input.extensions[:3] == ("jpg", "jpeg", "png")
    with pytest.raises(Exception):
        cfg.model.topk = 3  # frozen


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.precison'"):
        build_config({**BASE, "model": {"precison": "bf16"}})
    with pytest.raises(ConfigError, match=r"unknown key 'extra'"):
        build_config({**BASE, "extra": 1})


def test_wrong_type_named():
    with pytest.raises(ConfigError, match=r"'compute\.batch_size': Input should be a valid integer.*got '32'"):
        build_config({**BASE, "compute": {"batch_size": "32"}})
    with pytest.raises(ConfigError, match=r"'model\.precision': Input should be 'fp32', 'bf16' or 'fp16'"):
        build_config({**BASE, "model": {"precision": "fp8"}})


def test_missing_required_and_ranges():
    with pytest.raises(ConfigError, match=r"missing required key 'input'"):
        build_config({"output": {"uri": "o"}})
    with pytest.raises(ConfigError, match=r"max_actors \(1\) must be >= min_actors \(2\)"):
        build_config({**BASE, "compute": {"min_actors": 2, "max_actors": 1}})


def test_extensions_normalised():
    cfg = build_config({**BASE, "input": {"uri": "x", "extensions": [".JPG", "Png"]}})
    assert cfg.input.extensions == ("jpg", "png")


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {uri: a}\noutput: {uri: b}\n")
    cfg = load_config(path, ["model.precision=fp32", "compute.batch_size=8", "input.extensions=[jpg, png]",
                             "input.uri=s3://bucket/photos"])
    assert (cfg.model.precision, cfg.compute.batch_size) == ("fp32", 8)
    assert cfg.input.extensions == ("jpg", "png")
    assert cfg.input.uri == "s3://bucket/photos"
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        apply_overrides({}, ["model.precision"])


def test_secrets_redacted():
    cfg = build_config({"input": {"uri": "s3://b/p", "storage_options": {
        "key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://h:1"}}},
        "output": {"uri": "o", "storage_options": {"token": "t"}}})
    red = redacted(cfg)
    assert red["input"]["storage_options"] == {"key": "***", "secret": "***",
                                               "client_kwargs": {"endpoint_url": "http://h:1"}}
    assert red["output"]["storage_options"] == {"token": "***"}
    assert "s3cr3t" not in str(red)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "resnet_batch.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_config_errors_exit_nonzero(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("input: {uri: x}\noutput: {uri: y}\nmodel: {colour: red}\n")
    r = _cli("embed", "--config", str(cfg))
    assert r.returncode == 2
    assert "error: invalid config: unknown key 'model.colour'" in r.stderr
    assert "Traceback" not in r.stderr

    r = _cli("embed", "--config", str(cfg), "-o", "model={}", "-o", "compute.max_actors=abc")
    assert r.returncode == 2
    assert "'compute.max_actors': Input should be a valid integer" in r.stderr

    r = _cli("embed", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_cli_missing_input_fails_fast(tmp_path, checkpoint):
    r = _cli("embed", "--input", str(tmp_path / "no-such-dir"), "--output", str(tmp_path / "out"),
             "-o", f"model.weights={checkpoint}")
    assert r.returncode == 2
    assert f"error: input not found: {tmp_path / 'no-such-dir'} (input.uri)" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written, Ray never started


def test_compute_device_decides_whether_actors_ask_for_gpus():
    from resnet_batch.cluster import wants_gpu

    assert build_config(BASE).compute.device == "auto"
    assert [wants_gpu("auto", g) for g in (0, 0.5, 8)] == [False, True, True]  # the cluster as it is now
    assert [wants_gpu("cuda", g) for g in (0, 8)] == [True, True]  # GPU nodes the autoscaler will add
    assert [wants_gpu("cpu", g) for g in (0, 8)] == [False, False]
    with pytest.raises(ConfigError, match=r"'compute\.device': Input should be 'auto', 'cuda' or 'cpu'"):
        build_config({**BASE, "compute": {"device": "gpu"}})
    with pytest.raises(ConfigError, match=r"'compute\.gpus_per_actor': Input should be greater than 0"):
        build_config({**BASE, "compute": {"gpus_per_actor": 0}})
