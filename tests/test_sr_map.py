"""SR map: the LRP step against a numpy reference of the SR notebooks' rules (methods-spec section 1, step A),
the heatmap image (step B), the context-aware saliency of that image (step C), options, and the shared models."""

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_saliency import Explainer, SaliencyError
from onnx_saliency.methods.context_saliency import context_aware_saliency
from onnx_saliency.methods.sr_map import heatmap_image
from onnx_saliency.output.postprocess import minmax
from tests.graphs import conv3x3, make_model

CLASSES, EPS = 4, 1e-9


def _w(rng, *shape, scale=0.4):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """VGG-like: conv -> relu -> maxpool -> conv -> relu -> flatten -> gemm -> relu -> gemm (biases everywhere)."""
    rng = np.random.default_rng(2)
    p = {"w1": _w(rng, 4, 3, 3, 3), "b1": _w(rng, 4, scale=0.1), "w2": _w(rng, 5, 4, 3, 3), "b2": _w(rng, 5, scale=0.1),
         "f1": _w(rng, 10, 180, scale=0.2), "d1": _w(rng, 10, scale=0.1), "f2": _w(rng, CLASSES, 10, scale=0.6),
         "d2": _w(rng, CLASSES, scale=0.1)}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Flatten", ["a2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "f1", "d1"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu3"),
        helper.make_node("Gemm", ["r1", "f2", "d2"], ["logits"], transB=1, name="fc2"),
    ]
    model = make_model(nodes, [("input", (None, 3, 12, 12))], [("logits", (None, CLASSES))], p)
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="raw"))
    path = tmp_path_factory.mktemp("sr") / "net.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    return dict(path=path, x=x, p={k: v.astype(np.float64) for k, v in p.items()})


def _lrp0_conv(x, w, z, r):
    """R_in = x * conv^T(R / (z + eps sign(z))), z the conv output with its bias."""
    s = r / (z + EPS * np.where(z < 0, -1, 1))
    n, _, h, wd = x.shape
    back = np.zeros((n, x.shape[1], h + 2, wd + 2))
    for i in range(3):
        for j in range(3):
            back[:, :, i:i + h, j:j + wd] += np.einsum("nkhw,kc->nchw", s, w[:, :, i, j])
    return x * back[:, :, 1:-1, 1:-1]


def _zplus_dense(x, w, r):
    """R_i = x_i sum_j w+_ji R_j / (sum_i' x_i' w+_ji' + eps): no bias (w: outputs x inputs)."""
    wp = np.maximum(w, 0)
    return x * ((r / (x @ wp.T + EPS)) @ wp)


def reference_relevance(x, p, targets):
    x = x.astype(np.float64)
    c1 = conv3x3(x, p["w1"], p["b1"])
    a1 = np.maximum(c1, 0)
    p1 = a1.reshape(len(x), 4, 6, 2, 6, 2).max(axis=(3, 5))
    c2 = conv3x3(p1, p["w2"], p["b2"])
    flat = np.maximum(c2, 0).reshape(len(x), -1)
    r1 = np.maximum(flat @ p["f1"].T + p["d1"], 0)
    logits = r1 @ p["f2"].T + p["d2"]
    targets = np.where(targets < 0, logits.argmax(1), targets)
    rel = np.zeros_like(logits)
    rel[np.arange(len(x)), targets] = logits[np.arange(len(x)), targets]
    rel = _zplus_dense(r1, p["f2"], rel)          # ReLU: relevance passes unchanged
    rel = _zplus_dense(flat, p["f1"], rel).reshape(c2.shape)
    rel = _lrp0_conv(p1, p["w2"], c2, rel)
    routed = np.zeros_like(a1)                    # winner-take-all max-pool
    for n, c, i, j in np.ndindex(rel.shape):
        win = a1[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        a, b = np.unravel_index(np.argmax(win), (2, 2))
        routed[n, c, 2 * i + a, 2 * j + b] = rel[n, c, i, j]
    return _lrp0_conv(x, p["w1"], c1, routed), targets


def test_sr_map_matches_numpy_reference(net):
    ex = Explainer(net["path"])
    r = ex.explain(net["x"], method="sr-map", target=[-1, 2], ca_resolution=40, ca_grid=10)
    rel, targets = reference_relevance(net["x"], net["p"], np.array([-1, 2]))
    assert list(r.targets) == list(targets) and not r.signed
    scale = np.abs(rel).max()
    np.testing.assert_allclose(r.attributions, rel, rtol=1e-3, atol=1e-5 * scale)
    for i in range(2):
        heat = np.abs(rel[i]).transpose(1, 2, 0)
        heat = np.round((heat - heat.min()) / (heat.max() - heat.min()) * 255).astype(np.uint8)
        assert np.abs(heatmap_image(r.attributions[i]).astype(int) - heat).max() <= 1
        want = minmax(context_aware_saliency(heat, working_size=40, grid=10)[None])[0]
        np.testing.assert_allclose(r.maps[i], want, atol=2e-3)
    assert r.maps.shape == (2, 12, 12) and r.maps.min() == 0 and 0.99 < r.maps.max() <= 1
    assert r.options["composite"] == "sr-reference" and r.options["heatmap_mode"] == "rgb_abs"


def test_composite_option_and_errors(net):
    ex = Explainer(net["path"])
    flat = ex.explain(net["x"][:1], method="sr-map", composite="epsilon-plus-flat", ca_resolution=24, ca_grid=8)
    lrp = ex.explain(net["x"][:1], method="lrp", composite="epsilon-plus-flat")
    np.testing.assert_allclose(flat.attributions, lrp.attributions, rtol=1e-6)
    assert flat.options["composite"] == "epsilon-plus-flat"
    sr = ex.explain(net["x"][:1], method="sr-map", ca_resolution=24, ca_grid=8)
    as_lrp = ex.explain(net["x"][:1], method="lrp", composite="sr-reference")  # registered for every LRP method
    np.testing.assert_allclose(as_lrp.attributions, sr.attributions, rtol=1e-6)
    with pytest.raises(SaliencyError, match="--composite 'nope': unknown"):
        ex.explain(net["x"][:1], method="sr-map", composite="nope")
    with pytest.raises(SaliencyError, match="heatmap_mode='color'"):
        ex.explain(net["x"][:1], method="sr-map", heatmap_mode="color")


def test_heatmap_image_modes():
    rel = np.zeros((3, 2, 2))
    rel[0, 0, 0], rel[2, 1, 1], rel[1, 0, 1] = -4.0, 2.0, 1.0
    rgb = heatmap_image(rel)
    assert rgb.shape == (2, 2, 3) and rgb[0, 0, 0] == 255 and rgb[1, 1, 2] == 128 and rgb[0, 1, 1] == 64
    assert (heatmap_image(rel, bgr=True) == rgb[..., ::-1]).all()  # a BGR model's channels shown as RGB
    assert heatmap_image(rel, "gray_abs").tolist() == [[255, 64], [0, 128]]
    assert heatmap_image(rel, "gray_pos").tolist() == [[0, 128], [0, 255]]
    assert not heatmap_image(np.zeros((3, 2, 2))).any()


@pytest.mark.shared
@pytest.mark.parametrize("name", ["squeezenet1_1", "efficientnet_lite0", "efficientnet_lite0_bn", "open_nsfw"])
def test_sr_map_on_shared_models(shared, name):
    ex = Explainer(shared / "models" / f"{name}.onnx", threads=2)
    r = ex.explain(shared / "images" / "skimage" / "chelsea.png", method="sr-map")
    assert r.maps.shape == (1, 224, 224) and np.isfinite(r.maps).all() and np.ptp(r.maps) > 0.5
    assert np.isfinite(r.attributions).all() and r.attributions.shape == (1, 3, 224, 224)
