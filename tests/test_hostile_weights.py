"""Weights from hostile places: a file planted in the torch hub cache or given as a checkpoint never runs code.

Every loader hashes the bytes it read before anything unpickles them, and unpickles with
torch.load(weights_only=True) only. The planted files here write a marker file when unpickled the
unsafe way (torchvision's own hub loader did that before the hash check); the marker must never appear.
"""
import hashlib

import pytest
import torch

from resnet_batch.config import ModelConfig
from resnet_batch.errors import WeightsError
from resnet_batch.search.similar import QueryEmbedder
from resnet_batch.weights import hub_state_dict, resolve_weights, state_dict_sha256
from tests.helpers.httpserver import FileServer

V2_FILE = "resnet50-11ad3fa6.pth"  # torchvision's IMAGENET1K_V2 file name; the hex is the published sha256 prefix


class _WritesMarker:
    """Unpickling this opens `path` for writing: code run by whoever unpickles it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(path, marker) -> None:
    """A torch.save file that looks like a state dict and creates `marker` when unpickled with weights_only=False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": _WritesMarker(marker)}, path)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


@pytest.fixture
def planted_hub_file(torch_home, tmp_path):
    marker = tmp_path / "marker"
    plant(torch_home / "hub" / "checkpoints" / V2_FILE, marker)
    return torch_home / "hub" / "checkpoints" / V2_FILE, marker


def test_the_planted_file_does_run_code_when_unpickled_unsafely(planted_hub_file):
    path, marker = planted_hub_file
    torch.load(path, weights_only=False)  # what torchvision's get_state_dict did with the cached file
    assert marker.exists()


def test_embed_refuses_a_planted_hub_file_without_unpickling_it(planted_hub_file):
    path, marker = planted_hub_file
    with pytest.raises(WeightsError) as err:
        resolve_weights(ModelConfig(weights="IMAGENET1K_V2"))
    actual = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    assert str(err.value) == (
        f"cached weights {path} do not match the published hash ({actual} != 11ad3fa6), so nothing was loaded from "
        f"them: delete the file and download https://download.pytorch.org/models/{V2_FILE} again, or set "
        "model.weights to a checkpoint path.")
    assert not marker.exists()


def test_similar_refuses_a_planted_hub_file_without_unpickling_it(planted_hub_file):
    path, marker = planted_hub_file
    provenance = {"weights_id": "IMAGENET1K_V2", "weights_sha256": "0" * 64, "transforms": "IMAGENET1K_V2",
                  "precision": "fp32", "preprocessing": {}}
    with pytest.raises(WeightsError, match=rf"^cached weights {path} do not match the published hash .*: delete the "
                                           r"file and download .* \(or pass --weights with a checkpoint of the same "
                                           r"weights; their sha256 is checked against the index's\)$"):
        QueryEmbedder(provenance)
    assert not marker.exists()


def test_a_checkpoint_that_holds_code_is_refused_unrun(tmp_path):
    evil, marker = tmp_path / "evil.pth", tmp_path / "marker"
    plant(evil, marker)
    with pytest.raises(WeightsError) as err:
        resolve_weights(ModelConfig(weights=str(evil)))
    assert str(err.value) == (f"checkpoint {evil} is not a plain state dict; torch.load(weights_only=True) refused "
                              "it (it names io.open, which is code, not data): save it with "
                              "torch.save(model.state_dict(), path)")
    assert not marker.exists()


def test_hub_weights_are_downloaded_hashed_and_then_read_from_the_cache(torch_home, checkpoint, tmp_path):
    """The real hub path (torch.hub's downloader into $TORCH_HOME), on weights published by a local server."""
    data = checkpoint.read_bytes()
    name = f"resnet50-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    with FileServer({f"/models/{name}": data}) as server:
        url = server.url(f"/models/{name}")
        sd = hub_state_dict(url, "test weights")
        assert [r[0] for r in server.requests] == ["GET"]  # one download
    cached = torch_home / "hub" / "checkpoints" / name
    assert cached.read_bytes() == data
    assert state_dict_sha256(sd) == state_dict_sha256(torch.load(checkpoint, weights_only=True))
    assert state_dict_sha256(hub_state_dict(url, "test weights")) == state_dict_sha256(sd)  # server gone: cache
    # the cached file replaced by one that runs code: refused by its hash, never unpickled
    marker = tmp_path / "marker"
    plant(cached, marker)
    with pytest.raises(WeightsError, match=r"do not match the published hash .* delete the file and download"):
        hub_state_dict(url, "test weights")
    assert not marker.exists()


def test_a_download_with_the_wrong_hash_is_not_kept(torch_home, checkpoint):
    data = checkpoint.read_bytes()
    name = "resnet50-00000000.pth"  # published hash that the served bytes do not have
    with FileServer({f"/models/{name}": data}) as server, pytest.raises(WeightsError) as err:
        hub_state_dict(server.url(f"/models/{name}"), "test weights")
    assert str(err.value).startswith(f"could not download test weights (RuntimeError: invalid hash value (expected "
                                     f'"00000000", got "{hashlib.sha256(data).hexdigest()}")). Download ')
    assert not (torch_home / "hub" / "checkpoints" / name).exists()
