"""The embed job end to end through a real local Ray runtime: outputs, failures as data, report, resume."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from resnet_batch.decode import PreprocessSpec, decode_image
from resnet_batch.network import ResNet50Embedder
from resnet_batch.provenance import ProvenanceMismatch
from resnet_batch.embed.runner import run
from resnet_batch.schema import EMBEDDING_DIM, output_schema, read_provenance
from resnet_batch.weights import state_dict_sha256
from resnet_batch.output.store import OutputError
from tests.helpers.catalogue import NON_IMAGES, write_catalogue
from tests.helpers.jobs import job_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tree(tmp_path_factory, photos):
    """36 photos in shard folders + the bad/awkward catalogue + non-image files."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(photos, root, dirs_exist_ok=True)
    expected = {p.relative_to(root).as_posix(): "ok" for p in root.rglob("*.jpg")}
    expected.update(write_catalogue(root))
    return root, expected


@pytest.fixture(scope="module")
def first_run(tree, checkpoint, tmp_path_factory, ray_local):
    root, _ = tree
    out = tmp_path_factory.mktemp("out") / "embeddings"
    cfg = job_config(root, out, checkpoint)
    return cfg, out, run(cfg, progress=False)


def _read(out):
    return pads.dataset(str(out), format="parquet").to_table()


def test_every_input_is_accounted_for(tree, first_run):
    _, expected = tree
    cfg, out, report = first_run
    table = _read(out)
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(expected)  # one row per image, exactly once
    status = dict(zip(ids, table.column("status").to_pylist()))
    assert status == expected
    c = report["counts"]
    n_ok = sum(v == "ok" for v in expected.values())
    assert (c["ok"], c["failed"], c["skipped"]) == (n_ok, len(expected) - n_ok, len(NON_IMAGES))
    assert c["inputs"] == c["ok"] + c["failed"] + c["skipped"] == len(expected) + len(NON_IMAGES)
    assert sorted(report["skipped_files"]) == sorted(NON_IMAGES)
    assert report["complete"] is True
    assert json.loads((out / "_SUCCESS").read_text())["ok"] == n_ok


def test_failures_are_rows_with_reasons(first_run):
    _, out, _ = first_run
    rows = {r["image_id"]: r for r in _read(out).to_pylist()}
    assert rows["mixed/zero.jpg"]["error"] == "empty file (0 bytes)"
    assert rows["mixed/text.jpg"]["error"] == "not an image (format not recognised)"
    assert rows["mixed/truncated.jpg"]["error"].startswith("corrupt image:")
    assert rows["mixed/bomb.png"]["error"].startswith("decompression bomb refused")
    for r in rows.values():
        if r["status"] == "ok":
            assert r["error"] is None and len(r["embedding"]) == EMBEDDING_DIM and r["width"] > 0
        else:
            assert r["status"] == "decode_error" and r["embedding"] is None and r["topk_ids"] is None
    assert rows["mixed/exif-rotated.jpg"]["width"] == 300 and rows["mixed/exif-rotated.jpg"]["height"] == 400
    assert rows["mixed/name with spaces é ü 写真.jpg"]["status"] == "ok"


def test_parquet_schema_names_and_provenance(first_run, checkpoint):
    cfg, out, report = first_run
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == [f"part-{i:06d}.parquet" for i in range(len(parts))]  # deterministic names
    assert len(parts) == report["shards"]["total"] == -(-54 // 8)
    schema = pq.read_schema(out / parts[0])
    assert schema.remove_metadata().equals(output_schema())
    emb_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 2048
    assert emb_type.value_type == pa.float32()
    prov = read_provenance(schema)
    assert prov["weights_id"] == f"checkpoint:{checkpoint}"
    assert prov["weights_sha256"] == state_dict_sha256(torch.load(checkpoint, weights_only=True))
    assert prov["precision"] == "fp32" and prov["model"] == "torchvision.resnet50"
    assert prov["preprocessing"]["resize_size"] == 232 and prov["preprocessing"]["jpeg_draft"] is True
    assert prov == report["provenance"] == json.loads((out / "_provenance.json").read_text())
    saved = json.loads((out / "_run_report.json").read_text())
    assert saved["counts"] == report["counts"] and saved["img_per_s"] > 0
    assert set(saved["stages"]) >= {"decode_s", "model_s", "write_s", "model_busy_fraction", "verdict"}
    assert sum(saved["per_node"].values()) == report["counts"]["this_run"]["images"]
    assert saved["device"] == "cpu" and saved["gpu_requested"] is False  # no GPU in this Ray runtime
    assert [a["device"] for a in saved["actors"]] == ["cpu"] * saved["stages"]["model_actors"]
    assert sum(a["images"] for a in saved["actors"]) == report["counts"]["this_run"]["images"]


def test_embeddings_match_direct_computation(first_run, tree, checkpoint):
    root, _ = tree
    cfg, out, _ = first_run
    rows = {r["image_id"]: r for r in _read(out).to_pylist()}
    ids = ["mixed/good.jpg", "mixed/cmyk.jpg", sorted(i for i in rows if i.startswith("shard-"))[0]]
    spec = PreprocessSpec.from_weights("IMAGENET1K_V2")
    pixels = np.stack([decode_image((root / i).read_bytes(), spec, max_pixels=10**8, draft=True)[0] for i in ids])
    emb, logits = ResNet50Embedder(torch.load(checkpoint, weights_only=True), spec, precision="fp32").embed(pixels)
    probs = torch.softmax(logits, 1).topk(5)
    for k, i in enumerate(ids):
        np.testing.assert_allclose(rows[i]["embedding"], emb[k].numpy(), rtol=1e-4, atol=1e-4)
        assert rows[i]["topk_ids"] == probs.indices[k].tolist()


def test_rerun_resumes_without_recomputing(first_run):
    cfg, out, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    report = run(cfg, progress=False)
    assert report["shards"]["parts_written"] == 0 and report["sync"]["unchanged"] == 54
    assert report["counts"]["this_run"]["images"] == 0 and report["complete"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before


def test_resume_redoes_only_missing_shards(first_run):
    cfg, out, first = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    (out / "part-000002.parquet").unlink()
    (out / "_SUCCESS").unlink()
    report = run(cfg, progress=False)
    assert report["shards"]["parts_written"] == 1 and report["counts"]["this_run"]["images"] == 8
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert {k: v for k, v in after.items() if k != "part-000002.parquet"} == \
        {k: v for k, v in before.items() if k != "part-000002.parquet"}
    unchanged = ("this_run", "done_before")
    assert {k: v for k, v in report["counts"].items() if k not in unchanged} == \
        {k: v for k, v in first["counts"].items() if k not in unchanged}
    assert (out / "_SUCCESS").exists()


def test_resume_with_other_setup_is_refused(first_run):
    cfg, out, _ = first_run
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"precision": "bf16"})})
    with pytest.raises(ProvenanceMismatch, match=r"was written with a different setup: precision: 'fp32' != 'bf16'"):
        run(other, progress=False)


def test_resume_with_other_input_layout_is_refused(first_run):
    cfg, out, _ = first_run
    other = cfg.model_copy(update={"input": cfg.input.model_copy(update={"images_per_shard": 16})})
    with pytest.raises(OutputError, match=r"was made with other input settings: input.images_per_shard: 8 != 16; "
                                          r"use the earlier settings, another output.uri, or --fresh"):
        run(other, progress=False)


def test_retry_failed_folds_fixed_images_in(tmp_path, photos, checkpoint, ray_local):
    src = tmp_path / "in"
    shutil.copytree(photos / "shard-000", src)
    good = (src / sorted(p.name for p in src.glob("*.jpg"))[0]).read_bytes()
    (src / "late.jpg").write_bytes(good[:300])  # truncated now, complete later
    cfg = job_config(src, tmp_path / "out", checkpoint)
    first = run(cfg, progress=False)
    assert first["counts"]["failed"] == 1
    (src / "late.jpg").write_bytes(good)
    report = run(cfg, retry_failed=True, progress=False)
    assert report["counts"]["this_run"] == {"images": 1, "ok": 1, "failed": 0}
    assert (report["counts"]["ok"], report["counts"]["failed"]) == (first["counts"]["ok"] + 1, 0)
    table = _read(tmp_path / "out")
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 13 and "late.jpg" in ids
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_the_summary_names_the_index_to_build_then_the_one_to_update(first_run):
    from resnet_batch.embed.report import summary
    from resnet_batch.search.update import index_embeddings

    cfg, out, report = first_run
    index = f"{out}-index"
    assert f"  next: resnet-batch index --embeddings {out} --out {index}  (builds the index there; the same command " \
        "after a later run updates it)" in summary(report).splitlines()
    index_embeddings([str(out)], index, log=lambda msg: None)
    again = run(cfg, progress=False)
    assert f"  next: resnet-batch index --embeddings {out} --out {index}  (updates the index there with what " \
        "changed)" in summary(again).splitlines()


def test_a_night_whose_photos_all_failed_says_none_was_embedded(tmp_path, checkpoint, ray_local):
    from resnet_batch.embed.report import summary

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"broken-{i}.jpg").write_bytes(b"not a photo at all")
    report = run(job_config(src, tmp_path / "out", checkpoint), progress=False)
    assert report["complete"] and report["counts"]["this_run"] == {"images": 3, "ok": 0, "failed": 3}
    lines = summary(report).splitlines()
    assert "  this run: none embedded: all 3 failed; 0 already done" in lines
    assert "  nothing to index: no image of this output was embedded" in lines
    assert not any("next:" in line for line in lines)
