"""Property-based fuzzing with a fixed, derandomised budget (same examples on every run, CI included):
whatever the bytes, the model loader, the image loader, preprocessing and the annotation parser either
succeed or raise our one-line SaliencyError; nothing else escapes."""

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_saliency.errors import SaliencyError
from onnx_saliency.intake.model import load_model
from onnx_saliency.intake.preprocess import Preprocessing, load_image, prepare
from tests.graphs import tiny_classifier

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_WORK = Path(tempfile.mkdtemp(prefix="fuzz-"))  # one folder: hypothesis examples share no pytest tmp_path
atexit.register(shutil.rmtree, _WORK, True)
_MODEL_BYTES = tiny_classifier(_WORK / "seed.onnx").read_bytes()


def _one_line_error(err: SaliencyError):
    assert str(err) and "\n" not in str(err)


@st.composite
def mutated(draw, seed: bytes):
    """`seed` with a few byte flips, a cut, an insertion or a duplicated span."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            data = data[:at] + data[at + draw(st.integers(1, 64)):]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 32))]
    return bytes(data)


def _load_model_bytes(data: bytes, name="m.onnx"):
    path = _WORK / name
    path.write_bytes(data)
    try:
        loaded = load_model(path)
    except SaliencyError as err:
        _one_line_error(err)
        return None
    assert loaded.num_classes > 0 and loaded.input_name
    return loaded


@FUZZ
@given(st.binary(max_size=2048))
def test_model_loader_random_bytes(data):
    _load_model_bytes(data)


@FUZZ
@given(mutated(_MODEL_BYTES))
def test_model_loader_mutated_onnx(data):
    _load_model_bytes(data)


def _encoded_seeds():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    seeds = []
    for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp", ".ppm", ".gif"):
        try:
            ok, buf = cv2.imencode(ext, img)
        except cv2.error:
            continue  # an OpenCV build without that encoder
        if ok:
            seeds.append(buf.tobytes())
    ok, buf = cv2.imencode(".png", (rng.integers(0, 65535, (9, 7), dtype=np.uint16)))
    seeds.append(buf.tobytes())
    return seeds


_IMAGE_SEEDS = _encoded_seeds()


def _load_image_bytes(data: bytes):
    path = _WORK / "img.bin"
    path.write_bytes(data)
    try:
        img = load_image(path, max_pixels=1 << 20)
    except SaliencyError as err:
        _one_line_error(err)
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] * img.shape[1] <= 1 << 20


@FUZZ
@given(st.binary(max_size=1024))
def test_image_loader_random_bytes(data):
    _load_image_bytes(data)


@FUZZ
@given(st.sampled_from(_IMAGE_SEEDS).flatmap(mutated))
def test_image_loader_mutated_images(data):
    _load_image_bytes(data)


_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int8, np.float32, np.float64, np.bool_, np.int64])


@FUZZ
@given(st.lists(st.tuples(_DTYPES, st.lists(st.integers(0, 40), min_size=0, max_size=4)), min_size=0, max_size=3),
       st.sampled_from(["shorter", "square", "none"]), st.one_of(st.none(), st.integers(1, 24)),
       st.one_of(st.none(), st.integers(1, 24)), st.sampled_from(["torchvision", "caffe", "tf", "raw"]),
       st.sampled_from(["NCHW", "NHWC"]))
def test_prepare_random_arrays(specs, mode, resize, crop, preset, layout):
    rng = np.random.default_rng(0)
    arrays = [(rng.random(tuple(shape)) * 300).astype(dtype) for dtype, shape in specs]
    try:
        pre = Preprocessing(preset=preset, resize=resize, crop=crop, resize_mode=mode, layout=layout)
        batch, display = prepare(arrays, pre)
    except SaliencyError as err:
        _one_line_error(err)
        return
    assert batch.dtype == np.float32 and np.isfinite(batch).all() and len(batch) == len(arrays)
    assert display.dtype == np.uint8 and display.shape[0] == len(arrays)


try:
    from onnx_saliency.evaluation import annotations
except ImportError:  # written alongside this module; the other fuzz tests must not depend on it
    annotations = None
needs_annotations = pytest.mark.skipif(annotations is None, reason="onnx_saliency.evaluation.annotations is not present")

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 3000) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["images", "a.jpg", "boxes_in_file", "objects", "box", "mask", "class_index",
                         "imagenet_classes", "file_size_wh", "original_size_wh", "boxes_original", "label"])
        | st.text(max_size=6), inner, max_size=5),
    max_leaves=30)


@needs_annotations
@FUZZ
@given(_JSON)
def test_annotation_parser_random_json(value):
    path = _WORK / "ann.json"
    path.write_text(json.dumps(value), encoding="utf-8")
    try:
        parsed = annotations.load_annotations(path)
    except SaliencyError as err:
        _one_line_error(err)
        return
    assert isinstance(parsed, dict)


@needs_annotations
@FUZZ
@given(st.binary(max_size=512))
def test_annotation_parser_random_bytes(data):
    path = _WORK / "ann.json"
    path.write_bytes(data)
    try:
        annotations.load_annotations(path)
    except SaliencyError as err:
        _one_line_error(err)


def test_atheris_briefly(tmp_path):
    """A fixed budget of coverage-guided runs over the three parsers in one process (atheris optional)."""
    pytest.importorskip("atheris")
    import os
    import subprocess
    import sys

    seeds = []
    for tag, data in ((0, _MODEL_BYTES), (1, _IMAGE_SEEDS[0]), (2, b'{"images": {"a.png": {"boxes_in_file": '
                                                                 b'[[0, 0, 4, 4]]}}}')):
        seeds.append(tmp_path / f"seed{tag}")
        seeds[-1].write_bytes(bytes([tag]) + data)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "FUZZ_SEEDS": os.pathsep.join(map(str, seeds))}
    proc = subprocess.run([sys.executable, str(root / "tests" / "atheris_fuzz.py"), "all", "-runs=400", "-seed=1",
                           f"-artifact_prefix={tmp_path}/"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 400 runs" in proc.stderr
