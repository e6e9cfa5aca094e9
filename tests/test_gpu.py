"""The GPU path: batched JPEG decode on the model's device with a CPU fallback, and the CUDA actor.

The decode logic runs here with device="cpu" (torchvision's decode_jpeg takes the same lists there)
and is compared with the CPU decode path. Tests marked `gpu` need CUDA and skip without it;
benchmarks/gpu_check.sh runs them on a GPU machine.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from resnet_batch.decode import DEFAULT_FORMATS, PreprocessSpec, decode_image, decode_table
from resnet_batch.embed.gpu_decode import DeviceJpegDecoder, probe_image, probe_table
from resnet_batch.embed.model import ActorSettings, EmbedActor
from resnet_batch.output.store import PartSettings
from resnet_batch.dev.sample_data import jpeg_bytes, source_photos, variant
from resnet_batch.schema import STATUS_OK, STATUS_READ_ERROR, output_schema
from resnet_batch.weights import categories
from tests.helpers.catalogue import catalogue, png_bomb

SPEC = PreprocessSpec.from_weights("IMAGENET1K_V2")
LIMIT = 100_000_000
CUDA = "cuda" if torch.cuda.is_available() else None


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Photos of several sizes and both orientations, one grayscale, one smaller than the crop."""
    rng = np.random.default_rng(5)
    photos = source_photos()
    out = [jpeg_bytes(variant(photos[n], rng), 90) for n in sorted(photos)[:6]]
    out.append(jpeg_bytes(variant(photos["coffee"], rng, size=(333, 1000)), 85))  # tall
    out.append(jpeg_bytes(variant(photos["chelsea"], rng, size=(160, 120)), 90))  # upscaled to 232
    out.append(jpeg_bytes(variant(photos["astronaut"], rng).convert("L"), 90))  # grayscale JPEG
    return out


@pytest.fixture(scope="module")
def state_dict(checkpoint):
    return torch.load(checkpoint, weights_only=True)


def _read_table(blobs: list[bytes]) -> pa.Table:
    """Rows as the reader emits them (plus one row that failed to read)."""
    n = len(blobs)
    return pa.table({
        "image_id": [f"img-{i:03d}" for i in range(n)] + ["unreadable"],
        "path": [f"/x/img-{i:03d}" for i in range(n)] + ["/x/unreadable"],
        "bytes": pa.array(blobs + [b""], pa.binary()),
        "status": [STATUS_OK] * n + [STATUS_READ_ERROR],
        "error": [None] * n + ["PermissionError: denied"],
    })


def _cpu_crops(blobs, draft=False) -> np.ndarray:
    return np.stack([decode_image(b, SPEC, max_pixels=LIMIT, draft=draft)[0] for b in blobs])


# -- header probe (the read task's work in gpu_decode mode) ----------------------------------------

def test_probe_gives_displayed_size_and_routes_only_plain_jpegs_to_the_device():
    cat = catalogue()
    for name, (data, expected) in cat.items():
        if expected != "ok":
            continue
        width, height, device_ok = probe_image(data, LIMIT)
        _, cpu_w, cpu_h = decode_image(data, SPEC, max_pixels=LIMIT, draft=True)
        assert (width, height) == (cpu_w, cpu_h), name  # EXIF-rotated: displayed size, like the CPU path
        plain_jpeg = name.lower().endswith((".jpg", ".jpeg")) and name not in ("cmyk.jpg", "exif-rotated.jpg")
        assert device_ok == plain_jpeg, name


def test_probe_refuses_what_the_cpu_path_refuses_before_decoding():
    cat = catalogue()
    for name in ("zero.jpg", "text.jpg", "random.png", "bomb.png"):
        with pytest.raises(Exception) as probe_err:
            probe_image(cat[name][0], LIMIT)
        with pytest.raises(Exception) as cpu_err:
            decode_image(cat[name][0], SPEC, max_pixels=LIMIT, draft=True)
        assert str(probe_err.value) == str(cpu_err.value), name
    truncated = cat["truncated.jpg"][0]
    assert probe_image(truncated, LIMIT)[2] is False  # no end-of-image marker: Pillow will judge it


def test_probe_table_keeps_bytes_and_adds_the_decode_columns(jpegs):
    table = _read_table(jpegs[:3] + [png_bomb()])
    out = probe_table(table, max_pixels=LIMIT)
    assert "pixels" not in out.column_names
    assert out.column("bytes").to_pylist() == table.column("bytes").to_pylist()
    assert out.column("status").to_pylist() == ["ok", "ok", "ok", "decode_error", "read_error"]
    assert out.column("error")[4].as_py() == "PermissionError: denied"
    assert out.column("width").to_pylist()[:3] == [Image.open(io.BytesIO(b)).size[0] for b in jpegs[:3]]
    assert out.column("width")[3].as_py() == -1 and out.column("_device_ok").to_pylist() == [True] * 3 + [False] * 2
    assert [s > 0 for s in out.column("_decode_s").to_pylist()] == [True] * 4 + [False]  # the read error: not probed


# -- device decoder, run on the CPU ------------------------------------------------------------------

def test_resize_crop_equals_torchvision_transforms_on_tensors(jpegs):
    dec = DeviceJpegDecoder(SPEC, "cpu")
    reference = T.Compose([T.Resize(SPEC.resize_size, antialias=True), T.CenterCrop(SPEC.crop_size)])
    for data in jpegs:
        chw = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        ours = dec.resize_crop(chw).permute(2, 0, 1).int()
        ref = reference(chw.float()).round().clamp(0, 255).int()
        assert ours.shape == (3, 224, 224)
        assert (ours - ref).abs().max() <= 1


def test_same_size_images_are_resized_together_with_the_same_result(monkeypatch):
    import resnet_batch.embed.gpu_decode as gd

    dec = DeviceJpegDecoder(SPEC, "cpu")
    rng = np.random.default_rng(2)
    photo = source_photos()["rocket"]
    same = [torch.from_numpy(np.array(variant(photo, rng, size=(400, 300)).convert("RGB"))).permute(2, 0, 1)
            for _ in range(5)]
    assert {tuple(t.shape) for t in same} == {(3, 300, 400)}  # one size: one group, chunked below
    small = torch.full((3, 100, 120), 7, dtype=torch.uint8)  # another size: upscaled on its own
    images = [same[0], None, same[1], small, same[2], same[3], same[4]]  # None: a failed decode
    one_by_one = [None if im is None else dec.resize_crop(im) for im in images]
    monkeypatch.setattr(gd, "_CHUNK_PIXELS", 2 * 400 * 300)  # chunks of 2 same-size images
    for batched in (dec.resize_crop_many(images), DeviceJpegDecoder(SPEC, "cpu").resize_crop_many(images[::-1])[::-1]):
        assert [b is None for b in batched] == [o is None for o in one_by_one] == [False, True] + [False] * 5
        for b, o in zip(batched, one_by_one):
            if o is not None:
                assert torch.equal(b, o)
        assert torch.equal(batched[3], torch.full((224, 224, 3), 7, dtype=torch.uint8))  # a flat image stays flat


def test_device_decode_matches_the_cpu_decode_path(jpegs):
    out = DeviceJpegDecoder(SPEC, "cpu").decode(jpegs, [True] * len(jpegs))
    assert out.ok.all() and out.on_device == len(jpegs)
    assert out.pixels.shape == (len(jpegs), 224, 224, 3) and out.pixels.dtype == torch.uint8
    diff = np.abs(out.pixels.numpy().astype(int) - _cpu_crops(jpegs, draft=False).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 3  # same resize + crop; only the JPEG IDCT may differ
    draft = np.abs(out.pixels.numpy().astype(int) - _cpu_crops(jpegs, draft=True).astype(int))
    assert draft.mean() < 4  # the CPU path's reduced-size decode is close, not equal


def test_a_bad_image_in_a_batch_falls_back_alone():
    cat = catalogue()
    names = list(cat)
    blobs = [cat[n][0] for n in names]
    device_ok = []
    for b in blobs:
        try:
            device_ok.append(probe_image(b, LIMIT)[2])
        except Exception:
            device_ok.append(False)
    device_ok[names.index("truncated.jpg")] = True  # pretend the probe let it through: the batch must survive
    out = DeviceJpegDecoder(SPEC, "cpu").decode(blobs, device_ok)
    expected = np.array([cat[n][1] == "ok" for n in names])
    np.testing.assert_array_equal(out.ok, expected)
    assert out.on_device == sum(ok and e for ok, e in zip(device_ok, expected))
    assert out.on_device >= 3  # the good JPEGs still went through the device decoder
    assert "truncated" in out.error[names.index("truncated.jpg")]  # the CPU decoder's own message
    assert out.pixels.shape[0] == expected.sum()


class _ResizeFailsOn(DeviceJpegDecoder):
    """A device whose resize runs out of memory for images of some sizes (the fault lives in the test)."""

    def __init__(self, *args, failing_widths=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.failing_widths, self.failures = set(failing_widths), 0

    def _resize_crop_batch(self, nchw):
        if nchw.shape[-1] in self.failing_widths:
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._resize_crop_batch(nchw)


def test_a_failed_device_resize_falls_back_to_the_cpu_per_image(jpegs):
    widths = [Image.open(io.BytesIO(b)).size[0] for b in jpegs]
    failing = {widths[0], widths[6]}  # every image of these sizes fails on the device
    dec = _ResizeFailsOn(SPEC, "cpu", draft=False, failing_widths=failing)
    out = dec.decode(jpegs, [True] * len(jpegs))
    fell_back = [w in failing for w in widths]
    assert dec.failures >= 2 and out.ok.all() and out.error == [None] * len(jpegs)
    assert out.on_device == len(jpegs) - sum(fell_back)  # only what the device really produced counts
    device = DeviceJpegDecoder(SPEC, "cpu", draft=False).decode(jpegs, [True] * len(jpegs)).pixels.numpy()
    cpu = _cpu_crops(jpegs, draft=False)
    for i, back in enumerate(fell_back):  # fallen back: exactly the CPU path's crop; the rest: the device's
        np.testing.assert_array_equal(out.pixels[i].numpy(), cpu[i] if back else device[i])
    assert not np.array_equal(device[0], cpu[0])  # the two paths differ, so the comparison above tells them apart


# -- the actor with JPEG bytes (what the read task hands it in gpu_decode mode) ---------------------

def _actor(state_dict, out, use_gpu=False, precision="fp32"):
    part = PartSettings(str(out), {}, output_schema(), "zstd", "float32", 5.0, run=1)
    actor = EmbedActor(ActorSettings(spec=SPEC, categories=categories("IMAGENET1K_V2"), topk=5, precision=precision,
                                     channels_last=True, compile=False, use_gpu=use_gpu, require_cuda=False,
                                     threads=2, batch_size=4, max_pixels=LIMIT, draft=True,
                                     formats=DEFAULT_FORMATS, output=part))
    actor.ready(state_dict)
    return actor


def _block(table: pa.Table, shard: int) -> pa.Table:
    """A read task's chunk: the decoded (or probed) rows with the in-flight columns of one folder shard."""
    n = len(table)
    for name, value, type_ in (("_shard", shard, pa.int64()), ("_chunk", -1, pa.int32()), ("_rows", n, pa.int32()),
                               ("_chunks", -1, pa.int32()), ("_groups", -1, pa.int32()), ("_skipped", 0, pa.int32()),
                               ("_merge", False, pa.bool_())):
        table = table.drop_columns([name]) if name in table.column_names else table
        table = table.append_column(name, pa.array([value] * n, type_))
    return table


def _embed(actor, table: pa.Table, shard: int) -> tuple[dict, pa.Table]:
    """The actor's record for the chunk, and the part it wrote (rows in input order)."""
    (record,) = actor.process(_block(table, shard))
    part = pq.read_table(f"{actor.root}/{record['part']}")
    order = {i: k for k, i in enumerate(table.column("image_id").to_pylist())}
    return record, part.take(pa.array(sorted(range(len(part)), key=lambda r: order[part["image_id"][r].as_py()])))


def test_actor_decodes_bytes_and_matches_the_cpu_decode_path(state_dict, jpegs, tmp_path):
    blobs = jpegs + [catalogue()["cmyk.jpg"][0], catalogue()["truncated.jpg"][0]]
    table = _read_table(blobs)
    actor = _actor(state_dict, tmp_path)
    rec_gpu_path, probed = _embed(actor, probe_table(table, max_pixels=LIMIT), 0)
    rec_cpu_path, decoded = _embed(actor, decode_table(table, SPEC, LIMIT, False), 1)  # CPU path, full-size decode
    assert probed.column("status").to_pylist() == decoded.column("status").to_pylist() == \
        ["ok"] * (len(blobs) - 1) + ["decode_error", "read_error"]
    assert probed.column("error").to_pylist() == decoded.column("error").to_pylist()
    for col in ("width", "height"):
        assert probed.column(col).to_pylist() == decoded.column(col).to_pylist()
    ok = len(blobs) - 1
    a = np.array(probed.column("embedding").to_pylist()[:ok])
    b = np.array(decoded.column("embedding").to_pylist()[:ok])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999, cos
    assert "bytes" not in probed.column_names and "_device_ok" not in probed.column_names
    assert (rec_gpu_path["ok"], rec_gpu_path["failed"]) == (rec_cpu_path["ok"], rec_cpu_path["failed"]) == (ok, 2)
    assert rec_gpu_path["model_s"] > 0  # the device decode is part of the actor's busy time


@pytest.mark.ray
def test_bytes_travel_to_a_ray_actor_and_are_decoded_there(ray_local, state_dict, jpegs, tmp_path):
    """In gpu_decode mode the block holds encoded bytes; they reach a real Ray actor through the object store."""
    import ray

    probed = probe_table(_read_table(jpegs), max_pixels=LIMIT)
    local = _actor(state_dict, tmp_path / "local")
    remote = ray.remote(EmbedActor).remote(local.settings)
    ray.get(remote.ready.remote(ray.put(state_dict)))
    (record,) = ray.get(remote.process.remote(ray.put(_block(probed, 3))))
    assert record["part"] == "part-000003.parquet" and (record["ok"], record["failed"]) == (len(jpegs), 1)
    rows = sorted(pq.read_table(tmp_path / "local" / record["part"]).to_pylist(), key=lambda r: r["image_id"])
    _, here = _embed(local, probed, 4)
    for row, emb in zip(rows[:len(jpegs)], sorted(here.to_pylist(), key=lambda r: r["image_id"])):
        np.testing.assert_allclose(row["embedding"], emb["embedding"], rtol=1e-3, atol=1e-3)
    ray.kill(remote)


# -- on a real GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_nvjpeg_batch_matches_the_cpu_decode(jpegs):
    out = DeviceJpegDecoder(SPEC, CUDA).decode(jpegs, [True] * len(jpegs))
    assert out.ok.all() and out.on_device == len(jpegs) and out.pixels.device.type == "cuda"
    diff = np.abs(out.pixels.cpu().numpy().astype(int) - _cpu_crops(jpegs, draft=False).astype(int))
    assert diff.mean() < 3, diff.mean()  # nvJPEG's IDCT / chroma upsampling differ from libjpeg slightly


@pytest.mark.gpu
def test_nvjpeg_catalogue_statuses_equal_the_cpu_path():
    cat = catalogue()
    names = list(cat)
    table = _read_table([cat[n][0] for n in names])
    probed = probe_table(table, max_pixels=LIMIT)
    dec = DeviceJpegDecoder(SPEC, CUDA)
    out = dec.decode(probed.column("bytes").to_pylist(), probed.column("_device_ok").to_pylist(),
                     todo=np.array(probed.column("status").to_pylist()) == "ok")
    expected = np.array([cat[n][1] == "ok" for n in names] + [False])
    np.testing.assert_array_equal(out.ok, expected)


@pytest.mark.gpu
def test_cuda_actor_fp16_with_device_decode_is_close_to_cpu_fp32(state_dict, jpegs, tmp_path):
    table = _read_table(jpegs)
    gpu = _actor(state_dict, tmp_path / "gpu", use_gpu=True, precision="fp16")
    assert gpu.embedder.device.type == "cuda" and torch.backends.cudnn.benchmark
    _, got = _embed(gpu, probe_table(table, max_pixels=LIMIT), 0)
    _, ref = _embed(_actor(state_dict, tmp_path / "cpu"), decode_table(table, SPEC, LIMIT, False), 0)
    assert got.column("status").to_pylist() == ref.column("status").to_pylist()
    n = len(jpegs)
    a = np.array(got.column("embedding").to_pylist()[:n])
    b = np.array(ref.column("embedding").to_pylist()[:n])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.995, cos


@pytest.mark.gpu
@pytest.mark.ray
def test_run_with_gpu_decode_equals_cpu_decode_run(photos, checkpoint, tmp_path, ray_local):
    from resnet_batch.embed.runner import run
    from tests.helpers.jobs import job_config

    reports, tables = {}, {}
    for gpu_decode in (False, True):
        out = tmp_path / f"gpu_decode-{gpu_decode}"
        cfg = job_config(photos, out, checkpoint, model={"precision": "fp16"},
                         compute={"gpu_decode": gpu_decode, "gpus_per_actor": 1.0})
        reports[gpu_decode] = run(cfg, progress=False)
        tables[gpu_decode] = pq.read_table(sorted(out.glob("part-*.parquet"))).sort_by("image_id")
    for r in reports.values():
        assert r["complete"] and r["device"] == "cuda" and r["counts"]["ok"] == 36
    # With gpu_decode the read tasks only parse headers: their time is a small part of a full decode.
    assert reports[True]["stages"]["decode_s"] < reports[False]["stages"]["decode_s"] / 5
    a = np.array(tables[True].column("embedding").to_pylist())
    b = np.array(tables[False].column("embedding").to_pylist())
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.995, cos  # the CPU run used the reduced-size (draft) JPEG decode
