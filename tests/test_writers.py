import json
import os
import stat

import cv2
import numpy as np
import pytest

from onnx_saliency.output import writers
from onnx_saliency.errors import SaliencyError
from onnx_saliency.output.writers import ensure_dir, write_json, write_npy, write_png


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_png_roundtrip_rgb_and_gray(tmp_path):
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 250  # red
    path = write_png(tmp_path / "deep" / "er" / "a.png", rgb)  # parents created
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert bgr.shape == (5, 6, 3) and tuple(bgr[0, 0]) == (0, 0, 250)
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6)
    np.testing.assert_array_equal(cv2.imread(str(write_png(tmp_path / "g.png", gray)), cv2.IMREAD_UNCHANGED), gray)
    assert _no_temp_files(tmp_path) and _no_temp_files(tmp_path / "deep" / "er")
    with pytest.raises(SaliencyError, match="x.png: PNG needs uint8"):
        write_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))


def test_npy_roundtrip_keeps_exact_name(tmp_path):
    arr = np.random.default_rng(0).standard_normal((2, 7, 7)).astype(np.float32)
    path = write_npy(tmp_path / "maps.bin", arr)
    assert path.name == "maps.bin" and not (tmp_path / "maps.bin.npy").exists()
    back = np.load(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, arr)


def test_json_numpy_values_and_order(tmp_path):
    obj = {"z": np.float32(0.5), "a": np.int64(3), "flag": np.bool_(True), "arr": np.arange(3),
           "nested": [{"p": tmp_path / "x.png"}], "text": "café"}
    path = write_json(tmp_path / "r.json", obj)
    text = path.read_text("utf-8")
    assert text.endswith("\n") and '\n  "z": 0.5' in text and "café" in text
    loaded = json.loads(text)
    assert list(loaded) == ["z", "a", "flag", "arr", "nested", "text"]  # key order kept
    assert loaded["a"] == 3 and loaded["flag"] is True and loaded["arr"] == [0, 1, 2]
    assert loaded["nested"][0]["p"] == str(tmp_path / "x.png")
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and _no_temp_files(tmp_path)


def test_replace_failure_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.os, "replace", broken_replace)
    with pytest.raises(SaliencyError, match="out.json: cannot write") as err:
        write_json(target, {"version": 2, "big": list(range(1000))})
    assert "\n" not in str(err.value)
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_non_os_errors_propagate_unchanged(tmp_path, monkeypatch):
    target = tmp_path / "a.npy"
    write_npy(target, np.zeros(3))

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(writers.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_npy(target, np.ones(1000))
    np.testing.assert_array_equal(np.load(target), np.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_success_writes_full_content_and_normal_permissions(tmp_path):
    big = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    path = write_png(tmp_path / "big.png", big)
    np.testing.assert_array_equal(cv2.imread(str(path))[..., ::-1], big)
    write_png(path, big[:10, :10])  # overwrite an existing file
    assert cv2.imread(str(path)).shape == (10, 10, 3)
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o666 & ~writers._UMASK  # not mkstemp's 0600
    assert _no_temp_files(tmp_path)


def test_ensure_dir(tmp_path):
    assert ensure_dir(tmp_path / "a" / "b").is_dir()
    assert ensure_dir(tmp_path / "a" / "b").is_dir()  # idempotent
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaliencyError, match="cannot create folder"):
        ensure_dir(tmp_path / "file" / "sub")
    with pytest.raises(SaliencyError, match="cannot create folder"):
        write_json(tmp_path / "file" / "r.json", {})
