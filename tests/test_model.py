"""The model stage without Ray: one forward pass equals plain torchvision; weights resolution and its errors."""
import functools
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet50_Weights, resnet50

from resnet_batch.architecture import build_resnet
from resnet_batch.config import ModelConfig
from resnet_batch.decode import PreprocessSpec, decode_image, decode_table
from resnet_batch.embed.listing import Shard
from resnet_batch.embed.model import ActorSettings, EmbedActor
from resnet_batch.network import ResNet50Embedder
from resnet_batch.embed.reader import ChunkBuilder, ReadSettings
from resnet_batch.layouts import MSRA_V1, TORCHVISION
from resnet_batch.schema import PART_STATS_KEY, output_schema
from resnet_batch.output.store import PartSettings
from resnet_batch.dev.sample_data import jpeg_bytes, source_photos, variant
from resnet_batch.weights import (WeightsUnavailableError, categories, random_state_dict, resolve_weights,
                                  state_dict_sha256)

SPEC = PreprocessSpec.from_weights("IMAGENET1K_V2")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    photos = source_photos()
    return [jpeg_bytes(variant(photos[n], rng), 90) for n in ("astronaut", "coffee", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def state_dict(checkpoint):
    return torch.load(checkpoint, weights_only=True)


def _reference(state_dict, images):
    """Plain torchvision: weights.transforms() on the PIL image, model with its own fc."""
    model = resnet50(weights=None)
    model.load_state_dict(state_dict)
    model.eval()
    tf = ResNet50_Weights.IMAGENET1K_V2.transforms()
    x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    feats = {}
    model.avgpool.register_forward_hook(lambda m, i, o: feats.setdefault("pool", o.flatten(1)))
    with torch.inference_mode():
        logits = model(x)
    return feats["pool"], logits


def test_embedding_and_logits_equal_plain_torchvision(state_dict, images):
    pixels = np.stack([decode_image(b, SPEC, max_pixels=10**8, draft=False)[0] for b in images])
    emb, logits = ResNet50Embedder(state_dict, SPEC, precision="fp32", threads=2).embed(pixels)
    ref_emb, ref_logits = _reference(state_dict, images)
    assert emb.shape == (4, 2048) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, ref_emb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_batchnorm_folded_into_the_convolutions_keeps_the_function(state_dict, images):
    """Every BatchNorm is folded into its convolution, with running statistics far from the identity (trained
    weights have them; torchvision's initial ones are mean 0, variance 1) and in both layouts."""
    gen = torch.Generator().manual_seed(5)
    stats = dict(state_dict)
    for key, value in state_dict.items():
        if key.endswith("running_var"):
            stats[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
            stats[key] = 0.1 * torch.randn(value.shape, generator=gen)
    pixels = np.stack([decode_image(b, SPEC, max_pixels=10**8, draft=True)[0] for b in images])
    for layout in (TORCHVISION, MSRA_V1):
        model = build_resnet(layout)
        model.load_state_dict(stats)
        model.eval()
        pooled = {}
        model.avgpool.register_forward_hook(lambda m, i, o: pooled.setdefault("emb", o.flatten(1)))
        embedder = ResNet50Embedder(stats, SPEC, precision="fp32", threads=2, layout=layout)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in embedder.trunk.modules())
        assert all(m.bias is not None for m in embedder.trunk.modules() if isinstance(m, torch.nn.Conv2d))
        emb, logits = embedder.embed(pixels)
        with torch.inference_mode():
            ref_logits = model(embedder._to_device(pixels))  # the same normalised input, through the BatchNorms
        torch.testing.assert_close(emb, pooled["emb"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_fc_of_embedding_is_the_logits_and_bf16_is_close(state_dict, images):
    pixels = np.stack([decode_image(b, SPEC, max_pixels=10**8, draft=True)[0] for b in images])
    fp32 = ResNet50Embedder(state_dict, SPEC, precision="fp32", threads=2)
    emb, logits = fp32.embed(pixels)
    with torch.inference_mode():
        torch.testing.assert_close(fp32.fc(emb), logits, rtol=0, atol=0)
    emb16, logits16 = ResNet50Embedder(state_dict, SPEC, precision="bf16", threads=2).embed(pixels)
    assert emb16.dtype == torch.float32  # returned in fp32 whatever the compute precision
    cos = torch.nn.functional.cosine_similarity(emb, emb16)
    assert cos.min() > 0.99


def _actor(tmp_path, extra=(), **kw):
    part = PartSettings(str(tmp_path / "out"), {}, output_schema(extra), "zstd", "float32", 5.0, run=1)
    settings = ActorSettings(spec=SPEC, categories=categories("IMAGENET1K_V2"), topk=5, precision="fp32",
                             channels_last=True, compile=False, use_gpu=False, require_cuda=False, threads=2,
                             batch_size=2, max_pixels=10**8, draft=True, formats=("JPEG", "PNG"), output=part, **kw)
    return EmbedActor(settings)


def _block(images, shard=0, extra=(), chunked=False, passthrough=None):
    """A decoded chunk as a read task hands it over: two photos, a corrupt file, the shard's end row."""
    settings = ReadSettings("/in", "file", "/in", {}, ("jpg",), "jpg", tuple(extra), 1 << 26, 100, 2, 5.0,
                            decode=functools.partial(decode_table, spec=SPEC, max_pixels=10**8, draft=True))
    rows = ChunkBuilder(Shard(shard, "files", ()), settings, chunked=chunked)
    for i, data in enumerate([images[0], images[1], b"\xff\xd8 not a jpeg"]):
        list(rows.add(f"img-{i}.jpg", f"/in/img-{i}.jpg", data, extra=passthrough))
    return next(rows.finish())


def test_actor_writes_the_part_and_returns_only_a_record(state_dict, images, tmp_path):
    actor = _actor(tmp_path, extra=[pa.field("caption", pa.string())])
    info = actor.ready(state_dict)
    assert info["device"] == "cpu" and info["pid"] > 0
    (record,) = actor.process(_block(images, shard=7, extra=[pa.field("caption", pa.string())],
                                     passthrough={"caption": "a cat"}))
    assert record["part"] == "part-000007.parquet" and (record["rows"], record["ok"], record["failed"]) == (3, 2, 1)
    assert record["chunks"] == record["groups"] == 1 and record["bytes"] > 0 and record["model_s"] > 0
    t = pq.read_table(tmp_path / "out" / "part-000007.parquet")
    assert t.schema.remove_metadata().equals(output_schema([pa.field("caption", pa.string())]))
    rows = {r["image_id"]: r for r in t.to_pylist()}
    assert [rows[i]["status"] for i in sorted(rows)] == ["ok", "ok", "decode_error"]
    for r in (rows["img-0.jpg"], rows["img-1.jpg"]):
        assert r["topk_probs"] == sorted(r["topk_probs"], reverse=True)
        assert r["topk_labels"] == [categories("IMAGENET1K_V2")[i] for i in r["topk_ids"]]
        assert r["caption"] == "a cat"
    bad = rows["img-2.jpg"]
    assert bad["embedding"] is None and bad["topk_ids"] is None and bad["width"] is None
    pixels = np.stack([decode_image(b, SPEC, max_pixels=10**8, draft=True)[0] for b in images[:2]])
    emb, logits = actor.embedder.embed(pixels)
    np.testing.assert_allclose(rows["img-1.jpg"]["embedding"], emb[1].numpy(), rtol=1e-5, atol=1e-5)
    assert rows["img-0.jpg"]["topk_ids"] == torch.softmax(logits, 1).topk(5).indices[0].tolist()
    assert json.loads(pq.read_metadata(tmp_path / "out" / "part-000007.parquet").metadata[PART_STATS_KEY])["ok"] == 2


def test_actor_reports_failures_instead_of_raising(state_dict, images, tmp_path):
    actor = _actor(tmp_path)
    actor.ready(state_dict)
    block = _block(images)
    (split,) = actor.process(block.slice(0, 2))  # a chunk that arrived in pieces is never written
    assert split["error"] == "chunk arrived split (2 of 4 rows in one block)" and "part" not in split
    actor.embedder = None  # the model is gone: the forward pass raises
    (failed,) = actor.process(block)
    assert failed["error"].startswith("AttributeError") and not (tmp_path / "out" / "part-000000.parquet").exists()


def test_checkpoint_weights_resolved_with_hash(checkpoint, state_dict, tmp_path):
    info, sd = resolve_weights(ModelConfig(weights=str(checkpoint)))
    assert info.weights_id == f"checkpoint:{checkpoint}"
    assert info.sha256 == state_dict_sha256(state_dict) == state_dict_sha256(sd)
    assert info.transforms == "IMAGENET1K_V2"
    # A checkpoint saved as {"state_dict": ...} with DataParallel prefixes loads the same weights.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}, wrapped)
    assert resolve_weights(ModelConfig(weights=str(wrapped)))[0].sha256 == info.sha256


def test_random_weights_are_seeded_and_stamped():
    a, _ = resolve_weights(ModelConfig(weights="random", seed=5))
    b, _ = resolve_weights(ModelConfig(weights="random", seed=5))
    c, _ = resolve_weights(ModelConfig(weights="random", seed=6))
    assert a.weights_id == "random(seed=5)" and a.sha256 == b.sha256 != c.sha256


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"checkpoint not found: .*nope\.pth \(model\.weights\)"):
        resolve_weights(ModelConfig(weights=str(tmp_path / "nope.pth")))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match=r"is not a plain state dict; torch.load\(weights_only=True\) "
                                                      r"refused it"):
        resolve_weights(ModelConfig(weights=str(junk)))
    other = tmp_path / "resnet18.pth"
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), other)
    with pytest.raises(WeightsUnavailableError, match=r"is not a torchvision ResNet-50 state dict: .*missing"):
        resolve_weights(ModelConfig(weights=str(other)))


def test_pretrained_weights_unavailable_says_how_to_provide(tmp_path):
    """No network here: the torchvision enum goes through the torch hub cache and fails with instructions."""
    code = ("from resnet_batch.weights import resolve_weights\nfrom resnet_batch.config import ModelConfig\n"
            "try:\n    resolve_weights(ModelConfig(weights='IMAGENET1K_V2'))\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    # A file with the wrong content in the hub cache is found there and refused by its hash.
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(random_state_dict(0), cache / "resnet50-11ad3fa6.pth")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}).stdout
    assert out.startswith(f"WeightsError cached weights {cache}/resnet50-11ad3fa6.pth do not match "
                          "the published hash (")
    assert ("!= 11ad3fa6), so nothing was loaded from them: delete the file and download "
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth") in out
    # With an empty cache the download is tried; with no network the error says how to provide the file.
    (cache / "resnet50-11ad3fa6.pth").unlink()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}).stdout
    assert "WeightsError could not download torchvision weights ResNet50_Weights.IMAGENET1K_V2 (" in out
    assert f"place it at {cache}/resnet50-11ad3fa6.pth (or set TORCH_HOME)" in out
    assert "or set model.weights to a checkpoint path or URL" in out


def test_the_packages_resnet_is_torchvisions_module_for_module():
    """architecture.ResNet (defined in the package so that a model actor never imports torchvision) has
    torchvision's state dict keys and shapes, its seeded initialisation, and computes what resnet50 computes."""
    from resnet_batch.architecture import build_resnet
    from resnet_batch.layouts import TORCHVISION

    torch.manual_seed(3)
    ours = build_resnet(TORCHVISION).eval()
    torch.manual_seed(3)
    ref = resnet50(weights=None).eval()
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in b)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(ours(x), ref(x))


def test_a_model_replica_starts_without_importing_torchvision(tmp_path):
    torch.save(random_state_dict(7), tmp_path / "w.pth")
    code = ("import sys, torch; from resnet_batch.network import ResNet50Embedder; "
            "from resnet_batch.decode import PreprocessSpec; "
            f"e = ResNet50Embedder(torch.load({str(tmp_path / 'w.pth')!r}), "
            "PreprocessSpec(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), precision='bf16', threads=1); "
            "print(e.embed(__import__('numpy').zeros((1, 224, 224, 3), 'uint8'))[0].shape, 'torchvision' in sys.modules, "
            "'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # nor torch._dynamo (imported by normal_ on the meta device): each is over a second of CPU at the start
    assert out.stdout.split() == ["torch.Size([1,", "2048])", "False", "False"]


def test_the_weights_table_is_torchvisions_resnet50_weights():
    """torchvision_meta (read without importing torchvision) says what ResNet50_Weights says, member for member."""
    import torchvision

    from resnet_batch.torchvision_meta import RESNET50_WEIGHTS, imagenet_categories, torchvision_version

    assert set(RESNET50_WEIGHTS) == set(ResNet50_Weights.__members__)
    for name, member in ResNet50_Weights.__members__.items():
        t = member.transforms()
        assert RESNET50_WEIGHTS[name].url == member.url
        assert t.interpolation.value == "bilinear"  # the only mode PreprocessSpec implements
        assert PreprocessSpec.from_weights(name) == PreprocessSpec(t.resize_size[0], t.crop_size[0], tuple(t.mean),
                                                                   tuple(t.std))
        assert categories(name) == imagenet_categories() == tuple(member.meta["categories"])
    assert torchvision_version() == torchvision.__version__


def test_a_driver_resolves_and_stamps_weights_without_importing_torchvision(checkpoint):
    """The driver's start (weights resolved and checked, preprocessing, labels, provenance) imports neither
    torchvision nor torch._dynamo: about 1.2 s of CPU each at every run's start."""
    code = ("import sys; from resnet_batch.config import build_config; from resnet_batch.weights import "
            "resolve_weights, categories; from resnet_batch.decode import PreprocessSpec; "
            "from resnet_batch.provenance import build_provenance; "
            f"cfg = build_config({{'input': {{'uri': '/in'}}, 'output': {{'uri': '/out'}}, "
            f"'model': {{'weights': {str(checkpoint)!r}}}}}); "
            "info, sd = resolve_weights(cfg.model); spec = PreprocessSpec.from_weights(info.transforms); "
            "p = build_provenance(cfg, info, spec); "
            "print(len(categories(info.transforms)), spec.resize_size, p['torchvision'], 'torchvision' in sys.modules, "
            "'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import torchvision

    assert out.stdout.split() == ["1000", "232", torchvision.__version__, "False", "False"]
