"""The model stage without Ray: one forward pass equals plain torchvision; weights resolution and its errors."""
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet50_Weights, resnet50

from resnet_batch.config import ModelConfig
from resnet_batch.decode import PreprocessSpec, decode_image
from resnet_batch.model import EmbedActor, ResNet50Embedder
from resnet_batch.sample_data import jpeg_bytes, source_photos, variant
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


def test_actor_rows(state_dict, images):
    actor = EmbedActor(state_dict, SPEC, categories("IMAGENET1K_V2"), 5, "fp32", True, False, False, 2)
    pixels = np.stack([decode_image(b, SPEC, max_pixels=10**8, draft=True)[0] for b in images[:2]]
                      + [np.zeros((224, 224, 3), np.uint8)])
    batch = {"image_id": np.array(["a", "b", "c"], dtype=object), "path": np.array(["/a", "/b", "/c"], dtype=object),
             "status": np.array(["ok", "ok", "decode_error"], dtype=object),
             "error": np.array([None, None, "corrupt image: x"], dtype=object),
             "width": np.array([640, 480, -1], np.int32), "height": np.array([480, 640, -1], np.int32),
             "pixels": pixels, "_shard": np.array([0, 0, 0], np.int32), "caption": np.array(["x", float("nan"), "z"], dtype=object)}
    t = actor(batch)
    rows = t.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "decode_error"]
    for r in rows[:2]:
        assert r["topk_probs"] == sorted(r["topk_probs"], reverse=True)
        assert all(0.0 <= p <= 1.0 for p in r["topk_probs"])
        assert r["topk_labels"] == [categories("IMAGENET1K_V2")[i] for i in r["topk_ids"]]
        assert len(r["embedding"]) == 2048
    assert rows[2]["embedding"] is None and rows[2]["topk_ids"] is None and rows[2]["width"] is None
    assert rows[2]["error"] == "corrupt image: x"
    assert t.column("caption").to_pylist() == ["x", None, "z"]  # Ray's NaN-for-missing becomes null
    emb, logits = actor.embedder.embed(pixels[:2])
    top = torch.softmax(logits, 1).topk(5)
    assert rows[0]["topk_ids"] == top.indices[0].tolist()
    np.testing.assert_allclose(rows[1]["embedding"], emb[1].numpy(), rtol=1e-6)


def test_checkpoint_weights_resolved_with_hash(checkpoint, state_dict):
    info, sd = resolve_weights(ModelConfig(weights=str(checkpoint)))
    assert info.weights_id == f"checkpoint:{checkpoint}"
    assert info.sha256 == state_dict_sha256(state_dict) == state_dict_sha256(sd)
    assert info.transforms == "IMAGENET1K_V2"
    # A checkpoint saved as {"state_dict": ...} with DataParallel prefixes loads the same weights.
    wrapped = checkpoint.parent / "wrapped.pth"
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
    with pytest.raises(WeightsUnavailableError, match=r"is not a loadable state dict \(torch.load weights_only=True\)"):
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
    assert out.startswith(f"WeightsUnavailableError cached weights {cache}/resnet50-11ad3fa6.pth do not match "
                          "the published hash (")
    assert "!= 11ad3fa6): delete the file and download https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in out
    # With an empty cache the download is tried; with no network the error says how to provide the file.
    (cache / "resnet50-11ad3fa6.pth").unlink()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}).stdout
    assert "WeightsUnavailableError could not load torchvision weights ResNet50_Weights.IMAGENET1K_V2 (" in out
    assert f"place it at {cache}/resnet50-11ad3fa6.pth (or set TORCH_HOME)" in out
    assert "or set model.weights to a checkpoint path or URL" in out
