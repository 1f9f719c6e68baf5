"""Image intake beyond plain RGB: the documented conversions, header size checks for every accepted
format (before decoding), and clear refusals for what we do not take."""

import io
import struct

import cv2
import numpy as np
import pytest

from onnx_saliency.errors import SaliencyError
from onnx_saliency.intake.preprocess import Preprocessing, load_image, prepare

RED_BGR = (0, 0, 255)


def _pil_bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture()
def Image():
    return pytest.importorskip("PIL.Image")


def test_cmyk_jpeg_and_tiff_become_rgb(tmp_path, Image):
    red = Image.new("RGB", (8, 6), (255, 0, 0)).convert("CMYK")
    for fmt in ("JPEG", "TIFF"):
        path = tmp_path / f"cmyk.{fmt.lower()}"
        path.write_bytes(_pil_bytes(red, fmt))
        img = load_image(path)
        assert img.shape == (6, 8, 3)
        assert img[..., 0].min() > 240 and img[..., 1:].max() < 15, fmt


def test_grey_alpha_palette_and_one_bit(tmp_path, Image):
    cases = {"la.png": (Image.new("LA", (5, 4), (90, 10)), (90, 90, 90)),
             "p.png": (Image.new("RGB", (5, 4), (10, 200, 30)).quantize(2), (10, 200, 30)),
             "bit.png": (Image.new("1", (5, 4), 1), (255, 255, 255))}
    for name, (img, rgb) in cases.items():
        (tmp_path / name).write_bytes(_pil_bytes(img, "PNG"))
        out = load_image(tmp_path / name)
        assert out.shape == (4, 5, 3) and tuple(out[1, 1]) == rgb, name


def test_gif_and_webp_and_pnm(tmp_path, Image):
    rgb = Image.new("RGB", (9, 7), (255, 0, 0))
    for name, data in {"a.gif": _pil_bytes(rgb, "GIF"), "a.webp": _pil_bytes(rgb, "WEBP", lossless=True),
                       "b.webp": _pil_bytes(rgb, "WEBP", quality=90), "a.ppm": _pil_bytes(rgb, "PPM")}.items():
        (tmp_path / name).write_bytes(data)
        img = load_image(tmp_path / name)
        assert img.shape == (7, 9, 3) and img[3, 3, 0] > 240 and img[3, 3, 2] < 15, name


def test_float_tiff_is_taken_as_unit_range_and_signed_ints_are_refused(tmp_path):
    f = np.array([[0.0, 0.5], [1.0, 7.0]], np.float32)
    assert cv2.imwrite(str(tmp_path / "f.tiff"), f)
    img = load_image(tmp_path / "f.tiff")
    assert img[..., 0].tolist() == [[0, 128], [255, 255]]  # clipped to [0, 1], then x255 rounded
    assert cv2.imwrite(str(tmp_path / "s.tiff"), np.full((2, 2), -5, np.int16))
    with pytest.raises(SaliencyError) as err:
        load_image(tmp_path / "s.tiff")
    assert str(err.value) == f"{tmp_path / 's.tiff'}: unsupported sample type int16 (need 8/16-bit unsigned or float)"


def test_formats_we_do_not_header_check_are_refused(tmp_path):
    ok, hdr = cv2.imencode(".hdr", np.full((4, 4, 3), 0.5, np.float32))  # OpenCV reads it; we do not
    assert ok
    (tmp_path / "x.png").write_bytes(hdr.tobytes())  # the name does not matter, the content does
    with pytest.raises(SaliencyError) as err:
        load_image(tmp_path / "x.png")
    assert str(err.value) == (f"{tmp_path / 'x.png'}: not a readable image (unknown format; supported: PNG, JPEG, "
                              "BMP, GIF, WebP, TIFF, PNM)")


def _bomb(fmt: str) -> bytes:
    """A small file whose header claims 30000 x 30000 pixels."""
    if fmt == "bmp":
        ok, buf = cv2.imencode(".bmp", np.zeros((2, 2, 3), np.uint8))
        data = bytearray(buf.tobytes())
        data[18:26] = struct.pack("<ii", 30000, -30000)  # negative height: top-down rows
        return bytes(data)
    if fmt == "gif":
        return b"GIF89a" + struct.pack("<HH", 30000, 30000) + bytes(20)
    if fmt == "webp":
        vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (29999).to_bytes(3, "little") * 2
        return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    if fmt == "tiff":
        entries = [(256, 4, 1, 30000), (257, 4, 1, 30000)]
        ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
        return b"II*\x00" + struct.pack("<I", 8) + ifd
    if fmt == "pgm":
        return b"P5\n# a comment\n30000 30000\n255\n" + bytes(16)
    if fmt == "jpg":
        ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
        data = bytearray(buf.tobytes())
        i = data.index(b"\xff\xc0")
        data[i + 5:i + 9] = struct.pack(">HH", 30000, 30000)
        return bytes(data)
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["bmp", "gif", "webp", "tiff", "pgm", "jpg"])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, fmt, monkeypatch):
    path = tmp_path / f"bomb.{fmt}"
    path.write_bytes(_bomb(fmt))
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a) or None)
    with pytest.raises(SaliencyError) as err:
        load_image(path)
    assert str(err.value) == f"{path}: image has 900000000 pixels, more than the limit of 100000000"
    assert not decoded  # refused before OpenCV saw the data


def test_tiny_limit_and_corrupt_headers(tmp_path):
    assert cv2.imwrite(str(tmp_path / "a.bmp"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SaliencyError, match="image has 100 pixels, more than the limit of 99"):
        load_image(tmp_path / "a.bmp", max_pixels=99)
    (tmp_path / "b.gif").write_bytes(b"GIF89a\x01")
    with pytest.raises(SaliencyError) as err:
        load_image(tmp_path / "b.gif")
    assert str(err.value) == f"{tmp_path / 'b.gif'}: not a readable image (corrupt GIF header)"
    (tmp_path / "c.pgm").write_bytes(b"P5\n4 0\n255\n")
    with pytest.raises(SaliencyError, match="corrupt PNM header"):
        load_image(tmp_path / "c.pgm")


def test_jpeg_size_found_after_large_metadata(tmp_path):
    ok, buf = cv2.imencode(".jpg", np.zeros((6, 10, 3), np.uint8))
    app = b"\xff\xe2" + struct.pack(">H", 65535) + bytes(65533)  # an ICC-sized APP2 segment, twice
    data = buf.tobytes()
    (tmp_path / "meta.jpg").write_bytes(data[:2] + app + app + data[2:])
    assert load_image(tmp_path / "meta.jpg", max_pixels=60).shape == (6, 10, 3)
    with pytest.raises(SaliencyError, match="60 pixels, more than the limit of 59"):
        load_image(tmp_path / "meta.jpg", max_pixels=59)


def test_extreme_aspect_ratio_is_refused_before_resizing(monkeypatch):
    from onnx_saliency.intake import preprocess

    monkeypatch.setattr(preprocess, "MAX_PIXELS", 100_000)  # the default 10^8 needs a 1 x 6.3*10^6 strip
    strip = np.zeros((1, 20000, 3), np.uint8)  # resize shorter side 16 -> 16 x 320000 pixels
    with pytest.raises(SaliencyError) as err:
        prepare([strip], Preprocessing(resize=16, crop=16))
    assert str(err.value) == ("image 0 is 1x20000; resizing it to 16x320000 would exceed 100000 pixels "
                              "(aspect ratio too extreme)")
    prepare([np.zeros((1, 60, 3), np.uint8)], Preprocessing(resize=16, crop=16))  # 16 x 960: fine
