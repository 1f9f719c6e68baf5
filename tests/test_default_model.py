"""The embedded default model (models/default/shapes_cnn.onnx) and the model manifest.

onnxruntime, onnx, numpy and cv2 only: no torch. The preprocessing is written out here on
purpose (independently of the library's own preprocessing code) so that the shipped files are
checked against the contract in their metadata, not against themselves.
"""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import onnx
import pytest

from onnx_saliency.models import (
    DEFAULT_MODEL_PATH,
    DEFAULT_SAMPLES_DIR,
    load_manifest,
    lookup,
    lookup_file,
)

ort = pytest.importorskip("onnxruntime")

REQUIRED_META = [
    "onnx_saliency.preset",
    "onnx_saliency.resize",
    "onnx_saliency.crop",
    "onnx_saliency.resize_mode",
    "onnx_saliency.labels",
    "onnx_saliency.default_layer",
    "source",
]
MANIFEST_FIELDS = {"name", "preset", "resize", "crop", "resize_mode", "layout", "default_layer", "labels", "notes"}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(DEFAULT_MODEL_PATH))


@pytest.fixture(scope="module")
def meta(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(DEFAULT_MODEL_PATH), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def annotations() -> dict:
    return json.loads((DEFAULT_SAMPLES_DIR / "annotations.json").read_text())


def preprocess(path, size: int = 64) -> np.ndarray:
    """RGB, shorter side -> size (bilinear), centre crop size x size, x/127.5 - 1, NCHW."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    s = size / min(h, w)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    crop = rgb[y0:y0 + size, x0:x0 + size].astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None])


def test_files_exist_and_small():
    assert DEFAULT_MODEL_PATH.is_file()
    assert DEFAULT_MODEL_PATH.stat().st_size <= 500_000
    assert (DEFAULT_SAMPLES_DIR / "annotations.json").is_file()
    assert 6 <= len(list(DEFAULT_SAMPLES_DIR.glob("*.png"))) <= 8


def test_loads_and_checks(model):
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert opset["ai.onnx"] == 17
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 64, 64]


def test_metadata(meta, model):
    for k in REQUIRED_META:
        assert k in meta, k
    assert meta["onnx_saliency.preset"] == "tf"
    assert meta["onnx_saliency.resize"] == "64"
    assert meta["onnx_saliency.crop"] == "64"
    assert meta["onnx_saliency.resize_mode"] == "shorter"
    labels = json.loads(meta["onnx_saliency.labels"])
    assert isinstance(labels, list) and 4 <= len(labels) <= 6 and all(isinstance(x, str) for x in labels)
    # the default layer is the last spatial map: a Relu output feeding the global pooling
    layer = meta["onnx_saliency.default_layer"]
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[layer].op_type == "Relu"
    consumers = [n for n in model.graph.node if layer in n.input]
    assert [n.op_type for n in consumers] == ["GlobalAveragePool"]


def test_graph_ops(model):
    ops = [n.op_type for n in model.graph.node]
    # BatchNormalization deliberately kept (a BN-folding pass must have work to do)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) >= 3
    for n in bns:
        assert all(a.i == 0 for a in n.attribute if a.name == "training_mode")
        assert len(n.output) == 1
    for op in ("Conv", "Relu", "Add", "MaxPool", "GlobalAveragePool", "Gemm"):
        assert op in ops, op
    (mp,) = [n for n in model.graph.node if n.op_type == "MaxPool"]
    attrs = {a.name: list(a.ints) for a in mp.attribute if a.ints}
    assert attrs["kernel_shape"] == [3, 3] and attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    # the residual Add joins two Relu outputs
    producers = {o: n for n in model.graph.node for o in n.output}
    (add,) = [n for n in model.graph.node if n.op_type == "Add"]
    assert [producers[i].op_type for i in add.input] == ["Relu", "Relu"]


def test_samples_classified_correctly(session, annotations, meta):
    labels = json.loads(meta["onnx_saliency.labels"])
    images = annotations["images"]
    assert 6 <= len(images) <= 8
    assert set(images) == {p.name for p in DEFAULT_SAMPLES_DIR.glob("*.png")}
    single_classes = set()
    for name, info in images.items():
        path = DEFAULT_SAMPLES_DIR / name
        h, w = cv2.imread(str(path)).shape[:2]
        assert info["file_size_wh"] == [w, h], name
        objs = info["objects"]
        assert objs
        for o in objs:
            assert labels[o["class_index"]] == o["label"]
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (name, o)
        logits = session.run(None, {"input": preprocess(path)})[0]
        assert logits.shape == (1, len(labels))
        want = sorted(o["class_index"] for o in objs)
        top = sorted(np.argsort(-logits[0])[: len(want)].tolist())
        assert top == want, (name, [labels[i] for i in top], [labels[i] for i in want])
        if len(objs) == 1:
            single_classes.add(objs[0]["label"])
    assert single_classes == set(labels), "at least one single-object sample per class"
    assert any(len(i["objects"]) > 1 for i in images.values())


def test_dynamic_batch(session, annotations):
    names = sorted(annotations["images"])
    x = np.concatenate([preprocess(DEFAULT_SAMPLES_DIR / n) for n in names])
    batched = session.run(None, {"input": x})[0]
    single = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_manifest_matches_embedded_model(meta):
    sha = hashlib.sha256(DEFAULT_MODEL_PATH.read_bytes()).hexdigest()
    entry = lookup(sha)
    assert entry is not None, (
        "models/manifest.json has no entry for the shipped shapes_cnn.onnx: rerun "
        "`python -m onnx_saliency.models.build_default` (it rewrites the entry)")
    assert entry == lookup_file(DEFAULT_MODEL_PATH)
    assert entry["name"] == "shapes_cnn"
    assert entry["labels"] == "embedded"
    assert entry["preset"] == meta["onnx_saliency.preset"]
    assert str(entry["resize"]) == meta["onnx_saliency.resize"]
    assert str(entry["crop"]) == meta["onnx_saliency.crop"]
    assert entry["resize_mode"] == meta["onnx_saliency.resize_mode"]
    assert entry["default_layer"] == meta["onnx_saliency.default_layer"]
    # exactly one entry for the embedded model (a rebuild replaces, not appends)
    assert [e["name"] for e in load_manifest()["models"].values()].count("shapes_cnn") == 1


def test_manifest_schema():
    models = load_manifest()["models"]
    assert len(models) >= 5
    for sha, e in models.items():
        assert len(sha) == 64 and sha == sha.lower() and int(sha, 16) >= 0
        assert MANIFEST_FIELDS <= set(e), (sha, MANIFEST_FIELDS - set(e))
        assert e["layout"] in ("NCHW", "NHWC")
        assert e["resize_mode"] in ("shorter", "square")
        assert e["labels"] in ("imagenet", "nsfw2", "embedded")
        assert e["default_layer"] is None or isinstance(e["default_layer"], str)
        assert isinstance(e["resize"], int) and isinstance(e["crop"], int) and e["crop"] <= e["resize"]
    assert lookup("0" * 64) is None
    names = {e["name"] for e in models.values()}
    assert {"squeezenet1_1", "efficientnet_lite0", "efficientnet_lite0_bn", "open_nsfw", "shapes_cnn"} <= names
