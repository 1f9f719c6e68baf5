"""One network exported from PyTorch and from Keras (tf2onnx, NHWC input) with identical weights.

The torch model has seeded random weights (BatchNorm statistics and affine parameters randomised too, so BN
folding is really exercised); the Keras model is built layer for layer and receives the same weights,
transposed to Keras layouts: Conv OIHW -> HWIO, depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), Linear
(out, in) -> Dense (in, out), BatchNorm as [gamma, beta, moving mean, moving variance] with one epsilon.
The two ONNX files differ in layout (NCHW vs NHWC + Transpose), in how BatchNorm reaches the graph (folded by
torch's exporter, kept or decomposed by tf2onnx), in the head (Gemm vs MatMul + Add) and in every node name.

Checked: the frameworks agree with each other (logits), `onnx-saliency audit` calls the two files equal (exit 0,
every weight layer paired, maps Pearson ~1), a Keras twin with one changed conv weight is flagged at exactly
that layer, and Grad-CAM, gradient and LRP maps of the two exports are equal within float32 tolerance; the
input gradients of both also equal torch autograd and TensorFlow's GradientTape.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from onnx_saliency import Explainer  # noqa: E402
from onnx_saliency.audit import audit  # noqa: E402
from onnx_saliency.cli.main import main  # noqa: E402
from tests.exports import (export_keras, export_torch, import_tensorflow, keras_input_gradient,  # noqa: E402
                           relative_max_error, torch_input_gradient)
from tests.torch_shim import randomise_bn  # noqa: E402

pytestmark = pytest.mark.parity

SIZE, CLASSES, EPS = 32, 5, 1e-3
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
PERTURBED = (3, 5, 1, 1)        # the conv2 weight (OIHW index) the perturbed Keras twin changes


class TwinNet(torch.nn.Module):
    """conv-BN-ReLU-maxpool, conv-BN-ReLU, a residual depthwise conv-BN-ReLU branch, global average pool, linear."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, eps=EPS)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16, eps=EPS)
        self.dw, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16, eps=EPS)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        relu = torch.relu
        x = self.pool(relu(self.bn1(self.conv1(x))))
        x = relu(self.bn2(self.conv2(x)))
        x = x + relu(self.bn3(self.dw(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def keras_twin(net: TwinNet, perturb: float = 0.0):
    """The same network in Keras (NHWC), with net's weights; `perturb` is added to conv2's PERTURBED weight."""
    import_tensorflow()
    import keras
    from keras import layers

    def np_(t):
        return t.detach().numpy().astype(np.float32)

    def bn(m):
        return [np_(m.weight), np_(m.bias), np_(m.running_mean), np_(m.running_var)]

    w2 = np_(net.conv2.weight).copy()
    w2[PERTURBED] += perturb
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    c1 = layers.Conv2D(8, 3, padding="same", name="block1_conv")
    b1 = layers.BatchNormalization(epsilon=EPS, name="block1_bn")
    c2 = layers.Conv2D(16, 3, padding="same", name="block2_conv")
    b2 = layers.BatchNormalization(epsilon=EPS, name="block2_bn")
    dw = layers.DepthwiseConv2D(3, padding="same", name="block3_dwconv")
    b3 = layers.BatchNormalization(epsilon=EPS, name="block3_bn")
    fc = layers.Dense(CLASSES, name="predictions")
    x = layers.MaxPooling2D(2, name="block1_pool")(layers.ReLU(name="block1_relu")(b1(c1(inp))))
    x = layers.ReLU(name="block2_relu")(b2(c2(x)))
    x = layers.Add(name="block3_add")([x, layers.ReLU(name="block3_relu")(b3(dw(x)))])
    out = fc(layers.GlobalAveragePooling2D(name="avg_pool")(x))
    model = keras.Model(inp, out, name="twin")
    c1.set_weights([np_(net.conv1.weight).transpose(2, 3, 1, 0), np_(net.conv1.bias)])
    c2.set_weights([w2.transpose(2, 3, 1, 0), np_(net.conv2.bias)])
    dw.set_weights([np_(net.dw.weight).transpose(2, 3, 0, 1), np_(net.dw.bias)])
    for layer, m in ((b1, net.bn1), (b2, net.bn2), (b3, net.bn3)):
        layer.set_weights(bn(m))
    fc.set_weights([np_(net.fc.weight).T, np_(net.fc.bias)])
    return model


def _batch(n: int, seed: int) -> np.ndarray:
    """Smooth, image-like NCHW inputs with torchvision's normalisation."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 3, SIZE // 4, SIZE // 4)).repeat(4, axis=2).repeat(4, axis=3)
    img = 0.7 * base + 0.3 * rng.uniform(0, 1, (n, 3, SIZE, SIZE))
    return ((img - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_twin")
    torch.manual_seed(0)
    net = TwinNet()
    randomise_bn(net, 1)
    net.eval()
    km, perturbed = keras_twin(net), keras_twin(net, perturb=0.8)
    rng = np.random.default_rng(3)
    images = []
    for i in range(2):
        path = folder / f"img{i}.png"
        small = rng.integers(0, 255, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
        cv2.imwrite(str(path), cv2.resize(small, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST))
        images.append(path)
    return {"net": net, "keras": km,
            "torch_onnx": export_torch(net, folder / "twin_torch.onnx", SIZE, "legacy"),
            "keras_onnx": export_keras(km, folder / "twin_keras.onnx", preset="torchvision"),
            "perturbed_onnx": export_keras(perturbed, folder / "twin_keras_perturbed.onnx", preset="torchvision"),
            "images": images}


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_the_frameworks_compute_the_same_function(pair):
    x = _batch(3, seed=0)
    with torch.no_grad():
        ref = pair["net"](torch.from_numpy(x)).numpy()
    got = pair["keras"](x.transpose(0, 2, 3, 1), training=False).numpy()
    assert relative_max_error(got, ref) < 1e-5
    ex = Explainer(pair["keras_onnx"])
    assert ex.model.layout == "NHWC" and ex.model.report.absorbed_transpose
    assert relative_max_error(ex.predict(x.transpose(0, 2, 3, 1)), ref) < 1e-5


def test_audit_calls_torch_and_keras_exports_equal(pair, tmp_path):
    out = tmp_path / "audit"
    code, text = _run("audit", pair["torch_onnx"], pair["keras_onnx"], *pair["images"], "-m", "gradcam",
                      "-m", "gradient", "-m", "lrp", "--out", out)
    assert code == 0, text
    assert "verdict: AGREE" in text and "first diverging layer: none" in text
    data = json.loads((out / "audit.json").read_text())
    assert data["models"]["b"]["layout"] == "NHWC"
    pairs = data["structure"]["pairs"]
    weighted = [p for p in pairs if p["matched_by"] == "weights"]
    # conv1, conv2, the depthwise conv and the classifier, each paired by its weights up to layout
    assert [p["a_op"] for p in weighted] == ["Conv", "Conv", "Conv", "Gemm"], pairs
    assert all(p["weight_rel_diff"] < 1e-5 for p in weighted)
    assert all(p["b_node"] is not None and p["activation_rel_diff"] < 1e-4 for p in pairs), pairs
    for method in ("gradcam", "gradient", "lrp"):
        rows = data["explanations"][method]["per_image"]
        assert len(rows) == 2 and all(r["pearson"] > 0.9999 for r in rows), (method, rows)


def test_a_changed_keras_weight_is_flagged_at_that_layer(pair, tmp_path):
    out = tmp_path / "audit"
    code, text = _run("audit", pair["torch_onnx"], pair["perturbed_onnx"], *pair["images"], "-m", "gradcam",
                      "--out", out)
    assert code == 1, text
    assert "verdict: DIFFER" in text
    data = json.loads((out / "audit.json").read_text())
    first = data["structure"]["first_diverging_layer"]
    pairs = data["structure"]["pairs"]
    convs = [p for p in pairs if p["a_op"] == "Conv"]
    # the torch export's second Conv, paired with the Keras export's second Conv, for its weights
    assert (first["a_node"], first["b_node"]) == (convs[1]["a_node"], convs[1]["b_node"])
    assert "conv2" in first["a_node"] and "block2_conv" in first["b_node"], first
    assert any(w.startswith("weights differ") for w in first["why"]), first
    assert f"first diverging layer: {first['a_node']} (Conv) <-> {first['b_node']} (Conv): weights differ" in text
    before = pairs[:pairs.index(next(p for p in pairs if p["a_node"] == first["a_node"]))]
    assert before and all(p["activation_rel_diff"] < 1e-5 and not (p["weight_rel_diff"] or 0) > 1e-5
                          for p in before)


@pytest.mark.parametrize("method", ["gradcam", "gradient", "lrp"])
def test_maps_of_the_two_exports_are_equal(pair, method):
    x = _batch(2, seed=1)
    ex_t, ex_k = Explainer(pair["torch_onnx"]), Explainer(pair["keras_onnx"])
    layer_t, layer_k = ex_t.resolve_layer("auto"), ex_k.resolve_layer("auto")
    acts_t = ex_t.engine.run(x, expose=[layer_t])[layer_t]
    acts_k = ex_k.engine.run(x, expose=[layer_k])[layer_k]
    assert relative_max_error(acts_k, acts_t) < 1e-5, (layer_t, layer_k)  # "auto" is the same layer in both
    rt = ex_t.explain(x, method=method, target=[-1, 2])
    rk = ex_k.explain(x.transpose(0, 2, 3, 1), method=method, target=[-1, 2])
    assert (rt.targets == rk.targets).all() and np.allclose(rt.scores, rk.scores, rtol=1e-5, atol=1e-6)
    assert rt.maps.shape == rk.maps.shape == (2, SIZE, SIZE)
    assert relative_max_error(rk.maps, rt.maps) < 1e-4, method
    if rt.attributions is not None:
        assert relative_max_error(rk.attributions, rt.attributions) < 1e-4, method


def test_input_gradients_equal_torch_and_tensorflow_autograd(pair):
    x = _batch(2, seed=2)
    targets = [1, 4]
    g_torch = torch_input_gradient(pair["net"], x, targets)
    g_tf = keras_input_gradient(pair["keras"], x.transpose(0, 2, 3, 1), targets).transpose(0, 3, 1, 2)
    assert relative_max_error(g_tf, g_torch) < 1e-4  # the two frameworks agree with each other
    for path in (pair["torch_onnx"], pair["keras_onnx"]):
        ex = Explainer(path)
        xin = x if ex.model.layout == "NCHW" else x.transpose(0, 2, 3, 1)
        ours = ex.explain(xin, method="gradient", target=targets).attributions
        assert relative_max_error(ours, g_torch) < 1e-4 and relative_max_error(ours, g_tf) < 1e-4, path.name
