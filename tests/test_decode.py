"""Decode + preprocess, without Ray: torchvision-identical crops, EXIF, modes, reduced-size JPEG, failures, and only
the Pillow formats input.extensions allows."""
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from torchvision import transforms as T
from torchvision.models import ResNet50_Weights

from resnet_batch.config import DEFAULT_EXTENSIONS
from resnet_batch.decode import (DEFAULT_FORMATS, DecodeError, PreprocessSpec, crops_of, decode_image, decode_table,
                                 pillow_formats, resized_size)
from resnet_batch.dev.sample_data import jpeg_bytes, source_photos
from tests.helpers.catalogue import catalogue, exif_rotated_jpeg, png_bomb

SPEC = PreprocessSpec.from_weights("IMAGENET1K_V2")
LIMIT = 100_000_000


def test_spec_comes_from_the_weights():
    t = ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert (SPEC.resize_size, SPEC.crop_size) == (232, 224) == (t.resize_size[0], t.crop_size[0])
    assert SPEC.mean == tuple(t.mean) and SPEC.std == tuple(t.std)
    assert PreprocessSpec.from_weights("IMAGENET1K_V1").resize_size == 256


@pytest.mark.parametrize("size", [(640, 480), (375, 500), (801, 599), (224, 224)])
def test_resized_size_matches_torchvision(size):
    im = Image.new("RGB", size)
    assert T.Resize(232)(im).size == resized_size(*size, 232)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_full_decode_equals_torchvision_transform(name):
    photo = source_photos()[name]
    data = jpeg_bytes(photo.resize((700, 525)), quality=90)
    ours, w, h = decode_image(data, SPEC, max_pixels=LIMIT, draft=False)
    ref_t = T.Compose([T.Resize(232, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(224)])
    ref = np.asarray(ref_t(Image.open(io.BytesIO(data)).convert("RGB")))
    assert (w, h) == (700, 525)
    assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
    np.testing.assert_array_equal(ours, ref)


def test_draft_decode_close_to_full_decode():
    photo = source_photos()["astronaut"]
    data = jpeg_bytes(photo.resize((800, 600)), quality=90)
    full, *_ = decode_image(data, SPEC, max_pixels=LIMIT, draft=False)
    fast, w, h = decode_image(data, SPEC, max_pixels=LIMIT, draft=True)
    assert (w, h) == (800, 600)  # the original size is reported, not the reduced one
    diff = np.abs(full.astype(np.int16) - fast.astype(np.int16))
    assert 0 < diff.mean() < 3.0  # reduced-size DCT decode differs slightly, never grossly
    assert np.percentile(diff, 99) <= 20


def test_draft_not_used_when_image_is_already_small():
    data = jpeg_bytes(source_photos()["coffee"].resize((300, 240)), quality=90)
    a, *_ = decode_image(data, SPEC, max_pixels=LIMIT, draft=True)
    b, *_ = decode_image(data, SPEC, max_pixels=LIMIT, draft=False)
    np.testing.assert_array_equal(a, b)


def test_exif_orientation_applied():
    photo = source_photos()["coffee"].resize((400, 300))
    rotated, w, h = decode_image(exif_rotated_jpeg(photo), SPEC, max_pixels=LIMIT, draft=False)
    assert (w, h) == (300, 400)  # displayed size: portrait
    upright = Image.open(io.BytesIO(exif_rotated_jpeg(photo))).transpose(Image.Transpose.ROTATE_270)
    ref, *_ = decode_image(jpeg_bytes(upright, 100), SPEC, max_pixels=LIMIT, draft=False)
    # Same picture (re-encoded once more for the reference): close, and far from the unrotated one.
    unrotated, *_ = decode_image(jpeg_bytes(photo, 100), SPEC, max_pixels=LIMIT, draft=False)
    assert np.abs(rotated.astype(int) - ref.astype(int)).mean() < 3
    assert np.abs(rotated.astype(int) - unrotated.astype(int)).mean() > 20


@pytest.mark.parametrize("name,item", sorted(catalogue().items()))
def test_catalogue(name, item):
    data, expected = item
    if expected == "ok":
        pixels, w, h = decode_image(data, SPEC, max_pixels=LIMIT, draft=True)
        assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
        assert w >= 1 and h >= 1
    else:
        with pytest.raises(DecodeError):
            decode_image(data, SPEC, max_pixels=LIMIT, draft=True)


def test_failure_reasons_are_specific():
    cat = catalogue()

    def reason(name):
        with pytest.raises(DecodeError) as e:
            decode_image(cat[name][0], SPEC, max_pixels=LIMIT, draft=True)
        return str(e.value)

    assert reason("zero.jpg") == "empty file (0 bytes)"
    assert reason("text.jpg") == "not an image (format not recognised)"
    assert reason("truncated.jpg").startswith("corrupt image: image file is truncated")
    assert reason("bomb.png") == ("decompression bomb refused: Image size (3600000000 pixels) exceeds limit of "
                                  "178956970 pixels, could be decompression bomb DOS attack.")
    with pytest.raises(DecodeError) as e:  # under Pillow's own hard limit, over ours
        decode_image(png_bomb(12_000, 12_000), SPEC, max_pixels=LIMIT, draft=True)
    assert str(e.value) == ("image is 12000x12000 = 144000000 pixels, over the limit of 100000000 "
                            "(input.max_pixels); refused as a possible decompression bomb")


def test_sizes_of_awkward_images():
    cat = catalogue()
    assert decode_image(cat["panorama-4000x50.jpg"][0], SPEC, max_pixels=LIMIT, draft=True)[1:] == (4000, 50)
    assert decode_image(cat["tiny-1x1.png"][0], SPEC, max_pixels=LIMIT, draft=True)[1:] == (1, 1)
    px, *_ = decode_image(cat["tiny-1x1.png"][0], SPEC, max_pixels=LIMIT, draft=True)
    assert (px == np.array([200, 30, 40], dtype=np.uint8)).all()  # upsampled single colour
    gif = Image.open(io.BytesIO(cat["animated.gif"][0]))
    assert gif.n_frames == 2  # first frame is used
    first, *_ = decode_image(cat["animated.gif"][0], SPEC, max_pixels=LIMIT, draft=True)
    gif.seek(0)
    png = io.BytesIO()
    gif.convert("RGB").save(png, format="PNG")
    ref, *_ = decode_image(png.getvalue(), SPEC, max_pixels=LIMIT, draft=False)
    np.testing.assert_array_equal(first, ref)


def test_decode_table_keeps_every_row():
    cat = catalogue()
    names = ["good.jpg", "zero.jpg", "cmyk.jpg", "bomb.png"]
    table = pa.table({"bytes": [cat[n][0] for n in names], "status": ["ok", "ok", "ok", "read_error"],
                      "error": [None, None, None, "OSError: gone"]})
    result = decode_table(table, SPEC, LIMIT, True)
    out = result.select(["status", "error", "width"]).to_pydict()
    assert list(out["status"]) == ["ok", "decode_error", "ok", "read_error"]
    assert out["error"][1] == "empty file (0 bytes)" and out["error"][3] == "OSError: gone"
    # failed rows carry no pixels; the ok rows' crops come back without a copy, equal to decode_image's
    assert [len(b) for b in result.column("pixels").to_pylist()] == [224 * 224 * 3, 0, 224 * 224 * 3, 0]
    ok = np.array([s == "ok" for s in out["status"]])
    crops = crops_of(result.column("pixels"), ok, 224)
    assert crops.shape == (2, 224, 224, 3) and crops.base is not None
    np.testing.assert_array_equal(crops[1], decode_image(cat["cmyk.jpg"][0], SPEC, max_pixels=LIMIT, draft=True)[0])
    assert [w > 0 for w in out["width"]] == [True, False, True, False]
    with pytest.raises(ValueError, match="does not match the rows' decode status"):
        crops_of(result.column("pixels"), np.ones(4, bool), 224)


def test_decode_table_arrow_types():
    cat = catalogue()
    table = pa.table({"image_id": ["a", "b"], "bytes": [cat["good.jpg"][0], b""], "status": ["ok", "ok"],
                      "error": pa.array([None, None], pa.string())})
    out = decode_table(table, SPEC, LIMIT, True)
    assert out.schema.field("error").type == pa.string()
    assert out.column("status").to_pylist() == ["ok", "decode_error"]
    assert out.schema.field("pixels").type == pa.binary() and out.column("pixels")[1].as_py() == b""


# -- only the formats input.extensions allows are opened --------------------------------------------

def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    source_photos()["coffee"].resize((300, 240)).save(buf, format=fmt)
    return buf.getvalue()


def test_extensions_name_the_pillow_formats():
    assert DEFAULT_FORMATS == pillow_formats(DEFAULT_EXTENSIONS) == ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
    assert pillow_formats(["JPG", ".tif", "ico", "icns", "psd"]) == ("JPEG", "TIFF", "ICO", "ICNS", "PSD")
    assert pillow_formats(["jpeg", "jpg", "heic-without-a-plugin"]) == ("JPEG",)


@pytest.mark.parametrize("fmt", ["EPS", "ICNS", "ICO", "PCX", "SGI", "JPEG2000"])
def test_a_jpg_in_another_format_is_refused_without_running_its_decoder(fmt, monkeypatch):
    data = _encoded(fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a real file of that format: Pillow alone would open it
    opened = []
    plugin = Image.OPEN[fmt][0]
    monkeypatch.setattr(plugin, "_open", lambda self: opened.append(fmt))
    with pytest.raises(DecodeError) as err:
        decode_image(data, SPEC, max_pixels=LIMIT, draft=True)
    assert str(err.value) == (f"not a JPEG/PNG/WEBP/BMP/GIF/TIFF image: it looks like {fmt}, a format "
                              "input.extensions does not allow (not decoded)")
    assert opened == []


def test_formats_from_the_config_are_threaded_through_decode_table():
    ico, jpg = _encoded("ICO"), catalogue()["good.jpg"][0]
    table = pa.table({"bytes": [ico, jpg], "status": ["ok", "ok"], "error": pa.array([None, None], pa.string())})
    default = decode_table(table, SPEC, LIMIT, True)
    assert default.column("status").to_pylist() == ["decode_error", "ok"]
    assert default.column("error")[0].as_py().startswith("not a JPEG/PNG/WEBP/BMP/GIF/TIFF image: it looks like ICO")
    only_jpeg = decode_table(table, SPEC, LIMIT, True, formats=pillow_formats(["jpg"]))
    assert only_jpeg.column("error")[0].as_py().startswith("not a JPEG image: it looks like ICO")
    with_ico = decode_table(table, SPEC, LIMIT, True, formats=pillow_formats(["jpg", "ico"]))
    assert with_ico.column("status").to_pylist() == ["ok", "ok"]
    assert with_ico.column("pixels")[1].as_py() == default.column("pixels")[1].as_py()
    png = catalogue()["gray.png"][0]  # an allowed-by-default format the config left out
    with pytest.raises(DecodeError, match="^not a JPEG image: it looks like PNG"):
        decode_image(png, SPEC, max_pixels=LIMIT, draft=True, formats=("JPEG",))


def test_a_broken_header_of_an_allowed_format_is_called_corrupt():
    with pytest.raises(DecodeError) as err:
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(40), SPEC, max_pixels=LIMIT, draft=True)
    assert str(err.value) == "corrupt image: not a readable PNG header"
