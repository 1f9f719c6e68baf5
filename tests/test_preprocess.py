import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from onnx_saliency.errors import SaliencyError
from onnx_saliency.intake.preprocess import (
    META_CROP, META_LABELS, META_PRESET, META_RESIZE, META_RESIZE_MODE, PRESETS, Preprocessing, input_bounds,
    labels_from_metadata, load_image, prepare,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _solid(rgb, h=8, w=8):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


# --- presets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, rgb, expected", [
    ("torchvision", (0, 128, 255), [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225]),
    # caffe: model channel order is BGR, so channel 0 is blue.
    ("caffe", (10, 20, 30), [30 - 104, 20 - 117, 10 - 123]),
    ("tf", (0, 51, 255), [-1.0, 51 / 127.5 - 1, 1.0]),
    ("efficientnet-lite", (0, 127, 255), [-127 / 128, 0.0, 1.0]),
    ("raw", (0, 77, 255), [0.0, 77.0, 255.0]),
])
def test_preset_normalisation(preset, rgb, expected):
    pre = Preprocessing(preset=preset, resize=None, crop=None)
    batch, display = prepare([_solid(rgb)], pre)
    assert batch.dtype == np.float32 and batch.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(batch[0, :, 3, 5], expected, rtol=1e-6, atol=1e-6)
    assert (display[0] == rgb).all()  # display stays RGB whatever the model order


def test_presets_are_exactly_the_documented_ones():
    assert set(PRESETS) == {"torchvision", "caffe", "tf", "efficientnet-lite", "raw"}
    assert PRESETS["caffe"].channel_order == "BGR"
    assert all(PRESETS[p].channel_order == "RGB" for p in PRESETS if p != "caffe")


def test_input_bounds():
    lo, hi = input_bounds(Preprocessing())
    assert lo.dtype == hi.dtype == np.float32 and lo.shape == (3,)
    np.testing.assert_allclose(lo, [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(hi, [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rtol=1e-6)
    lo, hi = input_bounds(Preprocessing(preset="caffe"))
    np.testing.assert_array_equal(lo, [-104, -117, -123])
    np.testing.assert_array_equal(hi, [151, 138, 132])
    lo, hi = input_bounds(Preprocessing(preset="tf"))
    np.testing.assert_array_equal(lo, [-1, -1, -1])
    np.testing.assert_array_equal(hi, [1, 1, 1])


def test_bounds_match_prepared_extremes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    img[0, 0] = 0
    img[0, 1] = 255
    pre = Preprocessing(preset="caffe", resize=None, crop=None)
    batch, _ = prepare([img], pre)
    lo, hi = input_bounds(pre)
    np.testing.assert_array_equal(batch[0].min(axis=(1, 2)), lo)
    np.testing.assert_array_equal(batch[0].max(axis=(1, 2)), hi)


# --- geometry --------------------------------------------------------------------------------------------

def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return ys.mean(), xs.mean()


def test_shorter_side_resize_and_centre_crop_geometry():
    img = np.zeros((300, 400, 3), np.uint8)
    img[60:81, 300:321] = 255  # marker centred at (y=70, x=310)
    batch, display = prepare([img], Preprocessing())
    assert batch.shape == (1, 3, 224, 224) and display.shape == (1, 224, 224, 3)
    # shorter side 300 -> 256 (factor 256/300), long side int(256*400/300) = 341 (factor 341/400);
    # centre crop offsets: top round(16) = 16, left round(58.5) = 58 (half to even, as torchvision).
    y = (70 + 0.5) * 256 / 300 - 0.5 - 16
    x = (310 + 0.5) * 341 / 400 - 0.5 - 58
    cy, cx = _centroid(display[0, :, :, 0] > 127)
    assert abs(cy - y) < 0.6 and abs(cx - x) < 0.6


def test_portrait_resize_geometry():
    img = np.zeros((400, 300, 3), np.uint8)
    img[300:321, 60:81] = 255  # transpose of the landscape case
    _, display = prepare([img], Preprocessing())
    cy, cx = _centroid(display[0, :, :, 0] > 127)
    assert abs(cy - ((310 + 0.5) * 341 / 400 - 0.5 - 58)) < 0.6
    assert abs(cx - ((70 + 0.5) * 256 / 300 - 0.5 - 16)) < 0.6


def test_square_resize_ignores_aspect():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 100:] = 200  # right half bright
    _, display = prepare([img], Preprocessing(resize=64, crop=64, resize_mode="square"))
    assert display.shape == (1, 64, 64, 3)
    assert (display[0, :, :31] == 0).all() and (display[0, :, 33:] == 200).all()


def test_mode_none_crops_centre_or_refuses_small():
    img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    _, display = prepare([img], Preprocessing(resize_mode="none", crop=6))
    np.testing.assert_array_equal(display[0], img[2:8, 3:9])
    with pytest.raises(SaliencyError, match="smaller than crop 16"):
        prepare([img], Preprocessing(resize_mode="none", crop=16))


def test_layouts_agree():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(3)]
    nchw, d1 = prepare(imgs, Preprocessing(resize=40, crop=32))
    nhwc, d2 = prepare(imgs, Preprocessing(resize=40, crop=32, layout="nhwc"))
    assert nchw.shape == (3, 3, 32, 32) and nhwc.shape == (3, 32, 32, 3)
    assert nchw.flags.c_contiguous and nhwc.flags.c_contiguous
    np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), nhwc)
    np.testing.assert_array_equal(d1, d2)


def test_batch_of_mixed_sizes():
    imgs = [np.zeros((30, 50, 3), np.uint8), np.zeros((90, 40, 3), np.uint8)]
    batch, display = prepare(imgs, Preprocessing(resize=24, crop=20))
    assert batch.shape == (2, 3, 20, 20) and display.dtype == np.uint8
    with pytest.raises(SaliencyError, match="different sizes"):
        prepare(imgs, Preprocessing(resize=24, crop=None))


def test_prepare_rejects_bad_input():
    with pytest.raises(SaliencyError, match="no images"):
        prepare([], Preprocessing())
    with pytest.raises(SaliencyError, match="image 0"):
        prepare([np.zeros((8, 8), np.uint8)], Preprocessing())


# --- options and metadata --------------------------------------------------------------------------------

def test_validation_messages():
    with pytest.raises(SaliencyError, match="known presets: torchvision, caffe"):
        Preprocessing(preset="imagenet")
    with pytest.raises(SaliencyError, match="resize_mode"):
        Preprocessing(resize_mode="fit")
    with pytest.raises(SaliencyError, match="layout"):
        Preprocessing(layout="CHW")
    with pytest.raises(SaliencyError, match="crop"):
        Preprocessing(crop=0)
    with pytest.raises(SaliencyError, match="resize"):
        Preprocessing(resize=True)
    with pytest.raises(SaliencyError, match=r"crop \(300\) is larger than resize \(256\)"):
        Preprocessing(crop=300)
    Preprocessing(crop=300, resize_mode="none")  # no resize, so no conflict


def test_with_overrides():
    pre = Preprocessing()
    new = pre.with_overrides(preset="caffe", resize=None, crop=200)
    assert (new.preset, new.resize, new.crop) == ("caffe", 256, 200)
    assert pre.preset == "torchvision"  # original untouched
    with pytest.raises(SaliencyError, match="colour"):
        pre.with_overrides(colour="red")


def test_from_metadata_defaults_and_static_input():
    assert Preprocessing.from_metadata({}, "NCHW", None) == Preprocessing()
    assert Preprocessing.from_metadata({}, "NCHW", ("height", "width")) == Preprocessing()
    pre = Preprocessing.from_metadata({}, "NHWC", (299, 299))
    assert (pre.crop, pre.resize, pre.layout) == (299, 342, "NHWC")
    with pytest.raises(SaliencyError, match="224x320"):
        Preprocessing.from_metadata({}, "NCHW", (224, 320))


def test_from_metadata_keys():
    props = {META_PRESET: "caffe", META_RESIZE: "300", META_CROP: "288", META_RESIZE_MODE: "Square",
             "other": "ignored"}
    pre = Preprocessing.from_metadata(props, "NCHW", (288, 288))
    assert pre == Preprocessing(preset="caffe", resize=300, crop=288, resize_mode="square")
    assert Preprocessing.from_metadata({META_CROP: "256"}, "NCHW", None).resize == 293  # round(256*256/224)


@pytest.mark.parametrize("key, value", [
    (META_PRESET, "imagenet"), (META_RESIZE, "big"), (META_CROP, "-3"), (META_RESIZE_MODE, "fit"),
])
def test_from_metadata_bad_values_name_the_key(key, value):
    with pytest.raises(SaliencyError, match=key.replace(".", r"\.")):
        Preprocessing.from_metadata({key: value}, "NCHW", None)


def test_from_metadata_crop_mismatch_and_conflict():
    with pytest.raises(SaliencyError, match="onnx_saliency.crop=256"):
        Preprocessing.from_metadata({META_CROP: "256"}, "NCHW", (224, 224))
    with pytest.raises(SaliencyError, match="onnx_saliency.resize"):
        Preprocessing.from_metadata({META_RESIZE: "200"}, "NCHW", (224, 224))


def test_labels_from_metadata():
    assert labels_from_metadata({}) is None
    assert labels_from_metadata({META_LABELS: json.dumps(["cat", "dog"])}) == ["cat", "dog"]
    for bad in ("not json", "[]", '{"0": "cat"}', "[1, 2]"):
        with pytest.raises(SaliencyError, match=r"onnx_saliency\.labels"):
            labels_from_metadata({META_LABELS: bad})


# --- loading ---------------------------------------------------------------------------------------------

def _write(path, arr):
    assert cv2.imwrite(str(path), arr)
    return path


def test_load_color_png_is_rgb(tmp_path):
    bgr = _solid((10, 20, 30), 5, 7)  # stored as B=10, G=20, R=30
    img = load_image(_write(tmp_path / "c.png", bgr))
    assert img.shape == (5, 7, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (30, 20, 10)


def test_load_grayscale_rgba_16bit(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    img = load_image(_write(tmp_path / "g.png", gray))
    assert img.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], gray)

    bgra = np.zeros((4, 5, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 1, 2, 3, 0  # fully transparent
    img = load_image(_write(tmp_path / "a.png", bgra))
    assert img.shape == (4, 5, 3) and tuple(img[2, 2]) == (3, 2, 1)  # alpha dropped, not composited

    deep = np.zeros((3, 4, 3), np.uint16)
    deep[..., 2] = 65535
    deep[..., 1] = 257 * 100
    deep[..., 0] = 128  # rounds to 0
    img = load_image(_write(tmp_path / "d.png", deep))
    assert img.dtype == np.uint8 and tuple(img[1, 1]) == (255, 100, 0)

    gray16 = np.full((3, 3), 257 * 42, np.uint16)
    assert tuple(load_image(_write(tmp_path / "g16.png", gray16))[0, 0]) == (42, 42, 42)


def test_load_odd_path(tmp_path):
    folder = tmp_path / "dössier with spaces €"
    folder.mkdir()
    img = load_image(_write(folder / "imäge #1.png", _solid((0, 0, 255), 3, 3)))  # written via imencode
    assert tuple(img[0, 0]) == (255, 0, 0)


def _jpeg_with_orientation(bgr, orientation):
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    # Minimal big-endian TIFF with one IFD entry: Orientation (0x0112), SHORT, count 1.
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = buf.tobytes()
    return data[:2] + app1 + data[2:]  # right after SOI


def test_load_applies_exif_orientation(tmp_path):
    bgr = np.zeros((20, 40, 3), np.uint8)
    bgr[:8, :8] = (0, 0, 255)  # red block top-left
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_jpeg_with_orientation(bgr, 6))  # 6: rotate 90 degrees clockwise to display
    img = load_image(path)
    assert img.shape == (40, 20, 3)
    # Top-left goes to top-right under a clockwise quarter turn.
    assert img[:6, -6:, 0].mean() > 200 and img[:6, -6:, 2].mean() < 50
    assert img[-6:, :6].mean() < 30


@pytest.mark.parametrize("content, why", [
    (b"this is not an image\n", "text"),
    (b"", "empty"),
])
def test_unreadable_files(tmp_path, content, why):
    path = tmp_path / f"{why}.png"
    path.write_bytes(content)
    with pytest.raises(SaliencyError, match="not a readable image") as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(2)
    ok, buf = cv2.imencode(".png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "cut.png"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(SaliencyError, match="not a readable image") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(SaliencyError, match="nope.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(SaliencyError, match=str(tmp_path.name)):
        load_image(tmp_path)


def test_pixel_limit(tmp_path):
    png = _write(tmp_path / "big.png", np.zeros((100, 120, 3), np.uint8))
    jpg = _write(tmp_path / "big.jpg", np.zeros((100, 120, 3), np.uint8))
    bmp = _write(tmp_path / "big.bmp", np.zeros((100, 120, 3), np.uint8))  # no header parse: after decode
    for path in (png, jpg, bmp):
        assert load_image(path, max_pixels=12_000).shape == (100, 120, 3)
        with pytest.raises(SaliencyError, match="12000 pixels, more than the limit of 11999") as err:
            load_image(path, max_pixels=11_999)
        assert str(path) in str(err.value)


def test_pixel_limit_checked_before_decoding(tmp_path):
    # A PNG header claiming 20000x20000 pixels with no data: refused by the header check, not the decoder.
    ok, buf = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))
    data = bytearray(buf.tobytes())
    data[16:24] = struct.pack(">II", 20000, 20000)
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    with pytest.raises(SaliencyError, match="400000000 pixels"):
        load_image(path)


# --- real photo ------------------------------------------------------------------------------------------

@pytest.mark.shared
def test_shared_eagle():
    path = SHARED / "images" / "darknet" / "eagle.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found (shared reference data absent)")
    img = load_image(path)
    assert img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 224
    batch, display = prepare([img], Preprocessing())
    assert batch.shape == (1, 3, 224, 224) and batch.dtype == np.float32
    assert display.shape == (1, 224, 224, 3)
    lo, hi = input_bounds(Preprocessing())
    assert np.isfinite(batch).all()
    assert (batch.min(axis=(0, 2, 3)) >= lo).all() and (batch.max(axis=(0, 2, 3)) <= hi).all()
    assert -1.0 < batch.mean() < 1.5 and 0.2 < batch.std() < 2.0  # a photo, not a constant
