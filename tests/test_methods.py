"""Every method against an independent numpy reference on a built conv -> relu -> GAP -> gemm classifier.

For that head, dy_c/dA = W[c] / (h*w) at every position, so the CAM weights have closed forms.
"""

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_saliency import Explainer, SaliencyError
from onnx_saliency.output.postprocess import scale_cam_image
from tests.graphs import conv3x3, make_model

K, C, HW, CLASSES = 6, 3, 12, 4


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, C, 3, 3)).astype(np.float32) * 0.5
    b = rng.standard_normal(K).astype(np.float32) * 0.1
    fc = rng.standard_normal((CLASSES, K)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["feat"], name="relu"),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc"),
    ]
    model = make_model(nodes, [("input", (None, C, HW, HW))], [("logits", (None, CLASSES))], {"w": w, "b": b, "fc": fc})
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="raw"))
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.labels", value='["a","b","c","d"]'))
    path = tmp_path_factory.mktemp("net") / "net.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((3, C, HW, HW)).astype(np.float32)
    A = np.maximum(conv3x3(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)), 0)
    logits = A.mean(axis=(2, 3)) @ fc.T.astype(np.float64)
    return dict(path=path, x=x, A=A, fc=fc.astype(np.float64), logits=logits, w=w, b=b)


def _reference(net, method, targets):
    A, fc = net["A"], net["fc"]
    G = np.broadcast_to((fc[targets] / HW ** 2)[:, :, None, None], A.shape)
    if method in ("gradcam", "cam"):
        wts = G.mean(axis=(2, 3)) * (HW ** 2 if method == "cam" else 1)
        cam = np.einsum("nk,nkhw->nhw", wts, A)
    elif method == "gradcam++":
        g2, g3 = G ** 2, G ** 3
        aij = g2 / (2 * g2 + A.sum(axis=(2, 3))[:, :, None, None] * g3 + 1e-6)
        wts = (np.maximum(G, 0) * np.where(G != 0, aij, 0)).sum(axis=(2, 3))
        cam = np.einsum("nk,nkhw->nhw", wts, A)
    elif method == "xgradcam":
        wts = (G * A / (A.sum(axis=(2, 3))[:, :, None, None] + 1e-7)).sum(axis=(2, 3))
        cam = np.einsum("nk,nkhw->nhw", wts, A)
    elif method == "layercam":
        cam = (np.maximum(G, 0) * A).sum(1)
    elif method == "hirescam":
        cam = (G * A).sum(1)
    elif method == "gradcam-elementwise":
        cam = np.maximum(G * A, 0).sum(1)
    return np.maximum(cam, 0)


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                                    "gradcam-elementwise"])
def test_cam_methods_match_numpy_reference(net, method):
    ex = Explainer(net["path"])
    targets = [0, 2, 3]
    r = ex.explain(net["x"], method=method, layer="feat", target=targets)
    assert list(r.targets) == targets
    np.testing.assert_allclose(r.scores, net["logits"][np.arange(3), targets], rtol=1e-4, atol=1e-4)
    ref = _reference(net, method, np.array(targets))
    np.testing.assert_allclose(r.raw, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(r.maps, scale_cam_image(ref.astype(np.float32), (HW, HW)), atol=1e-4)


def test_top1_target_and_label_target(net):
    ex = Explainer(net["path"])
    r = ex.explain(net["x"], method="gradcam", layer="auto")
    assert list(r.targets) == list(net["logits"].argmax(1))
    r = ex.explain(net["x"], method="gradcam", target="c")
    assert list(r.targets) == [2, 2, 2]
    with pytest.raises(SaliencyError, match="not a class index and not a known label"):
        ex.explain(net["x"], target="zebra")
    with pytest.raises(SaliencyError, match="out of range"):
        ex.explain(net["x"], target=9)


def test_eigencam_is_first_principal_component(net):
    ex = Explainer(net["path"])
    r = ex.explain(net["x"], method="eigencam", layer="feat")
    for i, a in enumerate(net["A"]):
        flat = a.reshape(K, -1).T
        flat = flat - flat.mean(0)
        v = np.linalg.svd(flat)[2][0]
        ref = np.maximum((flat @ v).reshape(HW, HW), 0)
        if np.corrcoef(ref.ravel(), r.raw[i].ravel())[0, 1] < 0:  # the SVD sign is arbitrary
            ref = np.maximum(-(flat @ v).reshape(HW, HW), 0)
        np.testing.assert_allclose(r.raw[i], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_scorecam_pgc_weights(net):
    ex = Explainer(net["path"])
    r = ex.explain(net["x"][:1], method="scorecam", layer="feat", target=1)
    A = net["A"][0]
    masks = (A - A.min((1, 2), keepdims=True)) / (A.max((1, 2), keepdims=True) - A.min((1, 2), keepdims=True) + 1e-8)
    # at layer resolution == input resolution the align-corners upsampling is the identity
    x = net["x"][0].astype(np.float64)
    scores = []
    for k in range(K):
        Ak = np.maximum(conv3x3((x * masks[k])[None], net["w"].astype(np.float64), net["b"].astype(np.float64)), 0)
        scores.append((Ak.mean(axis=(2, 3)) @ net["fc"].T)[0, 1])
    s = np.exp(np.array(scores) - max(scores))
    cam = np.maximum(np.einsum("k,khw->hw", s / s.sum(), A), 0)
    np.testing.assert_allclose(r.raw[0], cam, rtol=1e-3, atol=1e-4 * cam.max())


def test_scorecam_channel_chunks_give_the_same_map(net):
    """Score-CAM masks its K channels one chunk of batch_size at a time (bounded memory): chunks of 1, 4 (one
    ragged) or all K give the same map, for several images with their own targets."""
    ex = Explainer(net["path"])
    maps = [ex.explain(net["x"], method="scorecam", layer="feat", target=[1, 2, 0], batch_size=bs).raw
            for bs in (1, 4, 32)]
    for m in maps[1:]:
        np.testing.assert_allclose(m, maps[0], rtol=1e-5, atol=1e-6 * np.abs(maps[0]).max())


def test_pixel_methods_closed_form(net):
    """y_c = mean(relu(conv(x))) . fc[c]: dy/dx = conv^T(mask * fc[c]/hw); check via numpy and IG completeness."""
    ex = Explainer(net["path"])
    x = net["x"]
    targets = np.array([1, 1, 1])
    g = ex.explain(x, method="gradient", target=1).attributions
    # float64 numpy forward: a tiny step crosses no ReLU kink, so central differences are exact to rounding
    eps = 1e-6
    rng = np.random.default_rng(1)
    v = rng.standard_normal(x.shape)
    def logit(z):
        A = np.maximum(conv3x3(z, net["w"].astype(np.float64), net["b"].astype(np.float64)), 0)
        return (A.mean(axis=(2, 3)) @ net["fc"].T)[np.arange(3), targets]
    fd = (logit(x + eps * v) - logit(x - eps * v)) / (2 * eps)
    np.testing.assert_allclose((g * v).sum(axis=(1, 2, 3)), fd, rtol=1e-3, atol=1e-4)
    gxi = ex.explain(x, method="gradient-x-input", target=1)
    np.testing.assert_allclose(gxi.attributions, g * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gxi.maps, (g * x).sum(1), rtol=1e-4, atol=1e-5)
    ig = ex.explain(x, method="integrated-gradients", target=1, steps=64)
    completeness = ig.attributions.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(completeness, logit(x) - logit(np.zeros_like(x)), rtol=2e-2, atol=2e-2)
    sg = ex.explain(x, method="smoothgrad", target=1, noise=np.zeros((3,) + x.shape, np.float32))
    np.testing.assert_allclose(sg.attributions, g, rtol=1e-5, atol=1e-6)
    gbp = ex.explain(x, method="guided-backprop", target=1).attributions
    assert gbp.shape == x.shape and np.isfinite(gbp).all()
    ggc = ex.explain(x, method="guided-gradcam", target=1, layer="feat")
    cam = ex.explain(x, method="gradcam", target=1, layer="feat")
    np.testing.assert_allclose(ggc.attributions, gbp * cam.maps[:, None], rtol=1e-5, atol=1e-6)


def test_bad_float_batch_shape(net):
    ex = Explainer(net["path"])
    with pytest.raises(SaliencyError, match=r"input array has shape \(1, 3, 5, 5\); net.onnx expects \(N, 3x12x12\)"):
        ex.explain(np.zeros((1, 3, 5, 5), np.float32))


def test_layers_listing(net):
    ex = Explainer(net["path"])
    names = [l.tensor for l in ex.layers()]
    assert names == ["conv", "feat"] and ex.resolve_layer("auto") == "feat"
    assert ex.resolve_layer("relu") == "feat" and ex.resolve_layer("-2") == "conv"
    with pytest.raises(SaliencyError, match="--layer 'nope': no such tensor, node or module"):
        ex.resolve_layer("nope")
