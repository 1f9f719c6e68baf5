"""Seed methods against numpy references written from methods-spec sections 2, 4, 5 and 6.

Built nets: conv -> relu (a1) -> conv -> relu (a2) -> GAP -> flatten -> gemm (+bias). With the GAP + linear head
the relevance, the excitation and the gradient at a2 have closed forms; one transposed 3x3 conv more gives them at
a1. The GE net adds a strided conv and a max-pool (the down-sampling layers GE multiplies by).
"""

import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_saliency import Explainer, SaliencyError
from onnx_saliency import lrp as L
from onnx_saliency.methods import Method, Result, get_method
from onnx_saliency.methods.gradual import GradualExtrapolation, downsampling_excitations, extrapolate
from onnx_saliency.methods.relevance_cam import relevance_cam_composite
from onnx_saliency.output.postprocess import scale_cam_image
from tests.graphs import conv3x3, make_model, tiny_classifier

C, K1, K2, HW, CLASSES = 3, 4, 5, 8, 4
EPS_RCAM, EPS_EB = 1e-9, 1e-12


def _conv_t(s, w):
    """The adjoint of _conv without bias: d<s, conv(x)>/dx."""
    n, _, h, wd = s.shape
    out = np.zeros((n, w.shape[1], h + 2, wd + 2))
    for i in range(3):
        for j in range(3):
            out[:, :, i:i + h, j:j + wd] += np.einsum("nkhw,kc->nchw", s, w[:, :, i, j])
    return out[:, :, 1:-1, 1:-1]


def _stab(z, eps):
    return z + eps * np.where(z < 0, -1.0, 1.0)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    rng = np.random.default_rng(3)
    p = {"w1": rng.standard_normal((K1, C, 3, 3)) * 0.5, "b1": rng.standard_normal(K1) * 0.1,
         "w2": rng.standard_normal((K2, K1, 3, 3)) * 0.4, "b2": rng.standard_normal(K2) * 0.2,
         "fc": rng.standard_normal((CLASSES, K2)), "fcb": rng.standard_normal(CLASSES)}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    model = make_model(nodes, [("input", (None, C, HW, HW))], [("logits", (None, CLASSES))],
                       {k: v.astype(np.float32) for k, v in p.items()})
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="raw"))
    path = tmp_path_factory.mktemp("seed") / "net.onnx"
    onnx.save(model, path)
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}
    x = rng.standard_normal((3, C, HW, HW)).astype(np.float32)
    c1 = conv3x3(x.astype(np.float64), p["w1"], p["b1"])
    a1 = np.maximum(c1, 0)
    c2 = conv3x3(a1, p["w2"], p["b2"])
    a2 = np.maximum(c2, 0)
    gap = a2.mean(axis=(2, 3))
    return dict(path=path, x=x, p=p, a1=a1, c2=c2, a2=a2, gap=gap, logits=gap @ p["fc"].T + p["fcb"],
                ex=Explainer(path))


def _maps(raw, size=(HW, HW)):
    """What every layer method returns: per-layer min-max + resize, then min-max again (pytorch-grad-cam's
    aggregate_multi_layers; its 1e-7 epsilon matters for the small raw values of these nets)."""
    return scale_cam_image(scale_cam_image(raw.astype(np.float32), size))


def _onehot(targets, value=1.0):
    r = np.zeros((len(targets), CLASSES))
    r[np.arange(len(targets)), targets] = value
    return r


# --- Relevance-CAM (spec section 2) ---------------------------------------------------------------------------

def _relevance_reference(net, targets, layer, init="clrp", conv_bias="zennit"):
    """CLRP start, z+ without bias on the dense layer, proportional GAP, ReLU pass, z+ on conv2; alpha = mean R."""
    p, gap, a1, a2 = net["p"], net["gap"], net["a1"], net["a2"]
    onehot = _onehot(targets)
    r = onehot * (1 + 1 / CLASSES) - 1 / CLASSES if init == "clrp" else onehot
    wp = np.maximum(p["fc"], 0)
    r_gap = gap * ((r / _stab(gap @ wp.T, EPS_RCAM)) @ wp)
    r_a2 = a2 * (r_gap / (_stab(gap, EPS_RCAM) * HW * HW))[:, :, None, None]
    if layer == "a2":
        A, R = a2, r_a2
    else:
        w2p = np.maximum(p["w2"], 0)
        if conv_bias == "zennit":
            z = conv3x3(a1, w2p, np.maximum(p["b2"], 0))
        else:  # the reference code: the bias in both partial sums, the x- one being 0 + b
            z = conv3x3(a1, w2p, 2 * p["b2"])
        A, R = a1, a1 * _conv_t(r_a2 / _stab(z, EPS_RCAM), w2p)
    alpha = R.mean(axis=(2, 3))
    return np.einsum("nk,nkhw->nhw", alpha, A)


@pytest.mark.parametrize("layer,init,conv_bias", [("a2", "clrp", "zennit"), ("a1", "clrp", "zennit"),
                                                  ("a1", "clrp", "reference"), ("a1", "lrp", "zennit")])
def test_relevance_cam_matches_numpy_reference(net, layer, init, conv_bias):
    targets = np.array([0, 2, 3])
    r = net["ex"].explain(net["x"], method="relevance-cam", layer=layer, target=list(targets), init=init,
                          conv_bias=conv_bias)
    ref = _relevance_reference(net, targets, layer, init, conv_bias)
    if init == "clrp":
        assert (ref < 0).any()  # no ReLU by default: the signed map reaches min-max
    np.testing.assert_allclose(r.raw, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(r.maps, _maps(ref), atol=1e-4)
    np.testing.assert_allclose(r.scores, net["logits"][np.arange(3), targets], rtol=1e-5, atol=1e-5)
    relu = net["ex"].explain(net["x"], method="relevance-cam", layer=layer, target=list(targets), init=init,
                             conv_bias=conv_bias, relu=1)
    np.testing.assert_allclose(relu.raw, np.maximum(ref, 0), rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_relevance_cam_weights_are_mean_relevance_of_the_propagator(tmp_path):
    """On a net with max-pool, for every layer and composite: raw map = sum_k mean(R_k) A_k, R from relevance_at."""
    ex = Explainer(tiny_classifier(tmp_path / "tiny.onnx"))
    x, _ = ex.prepare(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    x = np.concatenate([x, -x])
    for layer in ("a1", "p1", "a2"):
        for option, composite in ((None, relevance_cam_composite(ex.model.canonical)), ("zplus", "zplus")):
            r = ex.explain(x, method="relevance-cam", layer=layer, composite=option)
            out = L.relevance_at(ex.engine, x, r.targets, at=[layer], composite=composite, init="contrastive",
                                 expose=[layer])
            alpha = out["relevance"][layer].astype(np.float64).mean(axis=(2, 3))
            ref = np.einsum("nk,nkhw->nhw", alpha, out[layer])
            np.testing.assert_allclose(r.raw, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    calls = ex.engine.calls
    both = ex.explain(x, method="relevance-cam", layer=["a1", "a2"])
    assert ex.engine.calls == calls + 1  # several layers: one graph, one onnxruntime call
    singles = [ex.explain(x, method="relevance-cam", layer=layer).raw for layer in ("a1", "a2")]
    expected = scale_cam_image(np.mean([scale_cam_image(s, (16, 16)) for s in singles], axis=0))
    np.testing.assert_allclose(both.maps, expected, atol=1e-5)


# --- guidance-cam (spec section 5) ----------------------------------------------------------------------------

def _gradient(net, targets, layer):
    g_a2 = np.broadcast_to((net["p"]["fc"][targets] / HW ** 2)[:, :, None, None], net["a2"].shape)
    if layer == "a2":
        return g_a2
    return _conv_t(g_a2 * (net["c2"] > 0), net["p"]["w2"])


@pytest.mark.parametrize("layer", ["a1", "a2"])
@pytest.mark.parametrize("variant", ["global", "per-channel"])
def test_guidance_cam_matches_numpy_reference(net, layer, variant):
    targets = np.array([1, 1, 3])
    A, G = (net["a1"], _gradient(net, targets, "a1")) if layer == "a1" else (net["a2"], _gradient(net, targets, "a2"))
    alpha = G.mean(axis=(2, 3))
    if variant == "global":
        ref = np.maximum(np.einsum("nk,nkhw->nhw", alpha, A), 0) * np.maximum((A * G).sum(1), 0)
    else:
        ref = np.maximum(np.einsum("nk,nkhw->nhw", alpha, np.maximum(A * G, 0)), 0)
    r = net["ex"].explain(net["x"], method="guidance-cam", layer=layer, target=list(targets), variant=variant)
    np.testing.assert_allclose(r.raw, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(r.maps, _maps(ref), atol=1e-4)
    assert r.options["variant"] == variant


def test_guidance_cam_sidecar_says_formula_is_provisional(net):
    from onnx_saliency.output.sidecar import sidecar

    r = net["ex"].explain(net["x"][:1], method="guidance-cam", layer="a1")
    notes = sidecar(net["ex"], r, 0, Path("x.png"), {})["notes"]
    assert any("reconstructed from the paper's abstract" in n for n in notes)
    with pytest.raises(SaliencyError, match="variant"):
        net["ex"].explain(net["x"][:1], method="guidance-cam", layer="a1", variant="bogus")


# --- contrastive excitation backprop (spec section 6) -----------------------------------------------------

def test_guidance_cam_refuses_a_reference_mode(net):
    with pytest.raises(SaliencyError, match="no reference code"):
        net["ex"].explain(net["x"], method="guidance-cam", layer="a2", reference="true")


def _cmwp_reference(net, targets, layer):
    """TorchRay c-MWP: EB of the target minus EB of the negated classifier, no biases, maps ReLU(sum_c)."""
    p, gap, a1, a2, c2 = net["p"], net["gap"], net["a1"], net["a2"], net["c2"]
    e = _onehot(targets)

    def head(w):
        return gap * ((e / _stab(gap @ w.T, EPS_EB)) @ w)

    r_gap = head(np.maximum(p["fc"], 0)) - head(np.maximum(-p["fc"], 0))
    r_a2 = a2 * (r_gap / (_stab(gap, EPS_EB) * HW * HW))[:, :, None, None]
    if layer == "a2":
        return np.maximum(r_a2.sum(1), 0)
    r_c2 = r_a2 * (c2 > 0)
    w2p = np.maximum(p["w2"], 0)
    r_a1 = a1 * _conv_t(r_c2 / _stab(conv3x3(a1, w2p), EPS_EB), w2p)
    return np.maximum(r_a1.sum(1), 0)


@pytest.mark.parametrize("layer,contrast", [("a1", None), ("a1", "a2"), ("a2", None), ("a2", "a2")])
def test_cmwp_matches_numpy_reference(net, layer, contrast):
    targets = np.array([0, 1, 2])
    r = net["ex"].explain(net["x"], method="cmwp", layer=layer, target=list(targets), contrast_layer=contrast)
    ref = _cmwp_reference(net, targets, layer)
    assert ref.max() > 0 and (ref == 0).any()
    np.testing.assert_allclose(r.raw, ref, rtol=1e-4, atol=1e-5 * ref.max())
    np.testing.assert_allclose(r.maps, _maps(ref), atol=1e-4)
    assert r.options["classifier"] == "fc" and r.options["contrast_layer"] == (contrast or "flat")


def test_cmwp_rejects_misplaced_contrast_layer(net):
    with pytest.raises(SaliencyError, match="contrast_layer"):
        net["ex"].explain(net["x"], method="cmwp", layer="a1", contrast_layer="logits")
    with pytest.raises(SaliencyError, match="does not feed the contrast layer"):
        net["ex"].explain(net["x"], method="cmwp", layer="a2", contrast_layer="a1")
    with pytest.raises(SaliencyError, match="classifier"):
        net["ex"].explain(net["x"], method="cmwp", layer="a1", classifier="relu1")


# --- Gradual Extrapolation (spec section 4) -------------------------------------------------------------------

def _resize_half_pixel(m, size):
    """Bilinear, align_corners=False, edge-clamped (torch F.interpolate / cv2 INTER_LINEAR), (N, h, w)."""
    h, w = m.shape[-2:]

    def axis(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, src - 1), pos - lo

    y0, y1, fy = axis(h, size[0])
    x0, x1, fx = axis(w, size[1])
    rows = m[:, y0] * (1 - fy)[None, :, None] + m[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def _ge_reference(coarse, excitations, size, variant="original", combine="sum", first="raw", norm="zscore-clip",
                  ddof=0):
    out = []
    for i in range(len(coarse)):
        H = coarse[i][None].astype(np.float64)
        for k in range(len(excitations) - 1, -1, -1):
            e = excitations[k][i].astype(np.float64)
            if first == "skip" and k == 0:
                continue
            if variant == "upsample" and e.shape[-1] <= H.shape[-1]:
                continue
            H = _resize_half_pixel(H, e.shape[-2:])
            if first == "abs" and k == 0:
                e = np.abs(e)
            H = H * (e.sum(0) if combine == "sum" else e.max(0)) / e.max()
        H = _resize_half_pixel(H, size)[0]
        z = np.clip((H - H.mean()) / H.std(ddof=ddof), -1, 1) if norm == "zscore-clip" else H
        out.append((z - z.min()) / (z.max() - z.min()))
    return np.array(out)


@pytest.fixture(scope="module")
def ge_net(tmp_path_factory):
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc"),
    ]
    inits = {"w1": rng.standard_normal((6, 3, 3, 3)) * 0.5, "b1": rng.standard_normal(6) * 0.1,
             "w2": rng.standard_normal((5, 6, 3, 3)) * 0.3, "b2": rng.standard_normal(5) * 0.1,
             "fc": rng.standard_normal((CLASSES, 5))}
    model = make_model(nodes, [("input", (None, 3, 16, 16))], [("logits", (None, CLASSES))],
                       {k: v.astype(np.float32) for k, v in inits.items()})
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="raw"))
    path = tmp_path_factory.mktemp("ge") / "ge.onnx"
    onnx.save(model, path)
    ex = Explainer(path)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    return ex, x


def test_ge_finds_the_down_sampling_layers_below_the_map(ge_net):
    ex, _ = ge_net
    assert downsampling_excitations(ex.model, ["a2"]) == ["input", "c1", "p1"]
    assert downsampling_excitations(ex.model, ["a1"]) == ["input", "c1"]
    assert downsampling_excitations(ex.model, ["a1"], scope="all") == ["input", "c1", "p1"]


REFERENCE_SETTINGS = {"ge_excitation": "output", "ge_input": "raw", "ge_normalise": "zscore-clip"}


@pytest.mark.parametrize("options", [{}, {"ge_variant": "upsample"}, {"ge_input": "abs"}, {"ge_input": "raw"},
                                     {"ge_combine": "max"}, {"ge_normalise": "zscore-clip"},
                                     REFERENCE_SETTINGS, {**REFERENCE_SETTINGS, "ge_input": "skip"},
                                     {**REFERENCE_SETTINGS, "ge_variant": "upsample"}])
def test_ge_matches_numpy_reference(ge_net, options):
    ex, x = ge_net
    calls = ex.engine.calls
    r = ex.explain(x, method="gradcam+ge", layer="a2", **options)
    assert ex.engine.calls == calls + 1  # the excitations come out of Grad-CAM's own run
    gradcam = ex.explain(x, method="gradcam", layer="a2")
    np.testing.assert_allclose(r.raw, gradcam.raw, rtol=1e-6)
    acts = ex.engine.run(x, expose=["c1", "a1", "p1"])
    # by default the strided conv's excitation is the ReLU after it, and the image (the model input) is skipped
    stride = acts["c1"] if options.get("ge_excitation") == "output" else acts["a1"]
    first = options.get("ge_input", "skip")
    ref = _ge_reference(gradcam.raw, [x, stride, acts["p1"]], (16, 16), options.get("ge_variant", "original"),
                        options.get("ge_combine", "sum"), first, options.get("ge_normalise", "minmax"))
    assert r.maps.shape == (2, 16, 16) and r.maps.min() >= 0 and r.maps.max() <= 1
    np.testing.assert_allclose(r.maps, ref, atol=2e-4)
    assert r.method == "gradcam+ge" and r.options["base"] == "gradcam"


def test_ge_wraps_any_base_with_at_most_one_extra_forward(ge_net):
    ex, x = ge_net
    for name, extra in (("relevance-cam+ge", 0), ("cmwp+ge", 0), ("guidance-cam+ge", 0), ("lrp+ge", 1),
                        ("gradient+ge", 0)):
        calls = ex.engine.calls
        r = ex.explain(x, method=name, layer="a2")
        assert ex.engine.calls == calls + 1 + extra, name
        assert r.maps.shape == (2, 16, 16) and np.isfinite(r.maps).all()
        assert r.maps.min() >= 0 and r.maps.max() <= 1 and np.ptp(r.maps) > 0.5, name
    via_option = ex.explain(x, method="gradual-extrapolation", layer="a2", base="cmwp")
    np.testing.assert_allclose(via_option.maps, ex.explain(x, method="cmwp+ge", layer="a2").maps)
    with pytest.raises(SaliencyError, match="ge_variant"):
        ex.explain(x, method="gradcam+ge", layer="a2", ge_variant="sideways")
    with pytest.raises(SaliencyError, match="nope"):
        get_method("nope+ge")


def _resnet_style(order: str = "exporter"):
    """stem (strided conv, pool) -> bottleneck block (strided 3x3 conv2, strided 1x1 shortcut, Add(main,
    shortcut)) -> strided conv -> GAP head. Listed as torch runs it ("exporter"), shortcut first ("shortcut
    first", still topological) or reversed (not topological)."""
    rng = np.random.default_rng(11)
    conv = lambda i, o, name, s=1, k=3: helper.make_node(  # noqa: E731
        "Conv", [i, f"{name}_w", f"{name}_b"], [o], name=name, strides=[s, s], pads=[k // 2] * 4)
    relu = lambda i, o: helper.make_node("Relu", [i], [o], name=f"relu_{o}")  # noqa: E731
    main = [conv("input", "stem", "stem", 2), relu("stem", "stem_a"),
            helper.make_node("MaxPool", ["stem_a"], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
            conv("pool", "b_c1", "b_conv1", 1, 1), relu("b_c1", "b_a1"), conv("b_a1", "b_c2", "b_conv2", 2),
            relu("b_c2", "b_a2"), conv("b_a2", "b_c3", "b_conv3", 1, 1)]
    shortcut = [conv("pool", "b_sc", "b_shortcut", 2, 1)]
    tail = [helper.make_node("Add", ["b_c3", "b_sc"], ["b_sum"], name="b_add"), relu("b_sum", "b_out"),
            conv("b_out", "top", "top", 2), relu("top", "top_a"),
            helper.make_node("GlobalAveragePool", ["top_a"], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc")]
    nodes = {"exporter": main + shortcut + tail, "shortcut first": main[:3] + shortcut + main[3:] + tail,
             "reversed": (main + shortcut + tail)[::-1]}[order]
    shapes = {"stem": (6, 3, 3), "b_conv1": (4, 6, 1), "b_conv2": (4, 4, 3), "b_conv3": (8, 4, 1),
              "b_shortcut": (8, 6, 1), "top": (8, 8, 3)}
    inits = {"fc": rng.standard_normal((CLASSES, 8)).astype(np.float32)}
    for name, (o, i, k) in shapes.items():
        inits[f"{name}_w"] = (rng.standard_normal((o, i, k, k)) / np.sqrt(i * k * k)).astype(np.float32)
        inits[f"{name}_b"] = (rng.standard_normal(o) * 0.1).astype(np.float32)
    graph = helper.make_graph(nodes, "resnet_style",
                              [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", CLASSES])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="raw"))
    return model


def test_canonical_graphs_keep_the_exporters_order_and_ge_runs_in_execution_order(tmp_path):
    """Regression (issue 17 item 1): a fresh toposort lists the shortcut conv ahead of conv2; canonicalisation
    keeps the exporter's order, and GE reads the execution order from the data flow whatever the listing."""
    import onnx_graphsurgeon as gs

    from graph_passes.canonicalize import canonicalize

    model = _resnet_style()
    listed = [n.name for n in model.graph.node]
    resorted = [n.name for n in gs.export_onnx(gs.import_onnx(model).toposort()).graph.node]
    assert resorted != listed and resorted.index("b_shortcut") < resorted.index("b_conv2")  # the premise
    assert [n.name for n in canonicalize(model).graph.node] == listed
    backwards = canonicalize(_resnet_style("reversed"))  # a listing that is not topological is sorted
    assert sorted(n.name for n in backwards.graph.node) == sorted(listed)

    expected = ["input", "stem", "pool", "b_c2", "b_sc", "top"]
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    maps = {}
    for order in ("exporter", "shortcut first"):  # (reading a model refuses a non-topological listing)
        onnx.save(_resnet_style(order), tmp_path / "m.onnx")
        ex = Explainer(tmp_path / "m.onnx")
        assert downsampling_excitations(ex.model, ["top_a"]) == expected, order
        maps[order] = ex.explain(x, method="gradcam+ge", layer="top_a", reference="v2")
    gradcam = ex.explain(x, method="gradcam", layer="top_a")
    acts = ex.engine.run(x, expose=expected[1:])
    hooked = [x] + [acts[t] for t in expected[1:]]  # as the reference's forward hooks record them
    ref = _ge_reference(gradcam.raw, hooked, (32, 32), "upsample", ddof=1)
    for order, r in maps.items():
        np.testing.assert_allclose(r.maps, ref, atol=2e-4, err_msg=order)
    # the test can tell: with conv2 kept instead of the shortcut (the old listing bug) the map differs
    swapped = _ge_reference(gradcam.raw, [hooked[i] for i in (0, 1, 2, 4, 3, 5)], (32, 32), "upsample", ddof=1)
    assert np.abs(swapped - ref).max() > 0.1


class _Constant(Method):
    name = "constant"

    def __init__(self, value):
        self.value = value

    def explain(self, req):
        n = len(req.x)
        return Result(self.name, np.full((n, *req.size), self.value, np.float32), np.zeros(n, np.int64),
                      np.zeros(n), raw=np.full((n, 4, 4), self.value, np.float32))


def test_ge_is_no_op_safe(ge_net):
    """Constant or zero base maps and zero excitations stay finite, in [0, 1], at input resolution."""
    ex, x = ge_net
    from onnx_saliency.methods.base import Request

    req = Request(ex.engine, x, np.full(2, -1, np.int64), ["a2"])
    zero = GradualExtrapolation(_Constant(0.0)).explain(req).maps
    assert zero.shape == (2, 16, 16) and (zero == 0).all()
    flat = [GradualExtrapolation(_Constant(v)).explain(req).maps for v in (0.3, 7.0)]
    for m in flat:  # a constant map is shaped by the excitations alone, whatever its level
        assert m.shape == (2, 16, 16) and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
    np.testing.assert_allclose(flat[0], flat[1], atol=1e-6)
    zeros = [np.zeros((2, 3, 16, 16)), np.zeros((2, 6, 8, 8))]
    for base in (np.zeros((2, 4, 4)), np.full((2, 4, 4), 7.0), np.random.default_rng(0).random((2, 4, 4))):
        out = extrapolate(base, zeros, (16, 16))
        assert out.shape == (2, 16, 16) and np.isfinite(out).all() and (out == 0).all()
    out = extrapolate(np.random.default_rng(0).random((2, 4, 4)), [], (16, 16))
    assert out.shape == (2, 16, 16) and out.min() == 0 and out.max() == 1


# --- the shared real models ------------------------------------------------------------------------------

@pytest.mark.shared
def test_seed_methods_on_shared_models(shared):
    images = {"squeezenet1_1": "images/skimage/coffee.png", "efficientnet_lite0": "images/darknet/eagle.jpg",
              "efficientnet_lite0_bn": "images/darknet/eagle.jpg", "open_nsfw": "images/skimage/chelsea.png"}
    start = time.perf_counter()
    for name, image in images.items():
        ex = Explainer(shared / "models" / f"{name}.onnx", threads=2)
        for method in ("relevance-cam", "guidance-cam+ge", "cmwp+ge"):
            r = ex.explain(shared / image, method=method)
            for what, m in (("map", r.maps), ("base map", r.raw)):
                assert np.isfinite(m).all() and np.ptp(m) > 0, f"{name} {method}: {what} constant or not finite"
            assert r.maps.shape == (1, 224, 224), (name, method)
    assert time.perf_counter() - start < 60  # generous on a shared 2-core machine; typically about 12 s


@pytest.mark.shared
def test_ge_default_sharpens_gradcam_on_real_photos(shared):
    """Issue 17 item 6: on EfficientNet-Lite0 the default GE map follows Grad-CAM (positive correlation on every
    photo, Grad-CAM's pointing game kept), where the reference settings invert it on the dark dog. The
    numbers behind the choice: benchmarks/ge_defaults.py -> docs/ge_defaults.md."""
    from onnx_saliency.evaluation import metrics as M
    from onnx_saliency.evaluation.annotations import load_annotations

    ex = Explainer(shared / "models" / "efficientnet_lite0.onnx", threads=2)
    photos = [shared / "images" / "darknet" / f for f in ("dog.jpg", "eagle.jpg", "person.jpg")]

    def pearson(a, b):
        return np.array([np.corrcoef(u.ravel(), v.ravel())[0, 1] for u, v in zip(a, b)])

    gradcam = ex.explain(photos, method="gradcam").maps
    r = pearson(ex.explain(photos, method="gradcam+ge").maps, gradcam)
    assert (r > 0.85).all(), r
    old = pearson(ex.explain(photos, method="gradcam+ge", ge_excitation="output", ge_input="raw",
                             ge_normalise="zscore-clip").maps, gradcam)
    assert old[0] < -0.3, old  # the reference settings invert the dog (the test can tell)

    folder = shared / "images" / "imagenet_val"
    names = sorted(load_annotations(folder / "annotations.json"))[:5]  # the 224x224 copies, fed as they are
    ann = load_annotations(folder / "annotations.json")
    pre = ex.preprocessing.with_overrides(resize_mode="none")
    from onnx_saliency.intake.preprocess import load_image, prepare

    x, _ = prepare([load_image(folder / n) for n in names], pre)
    targets = [ann[n].classes[0] for n in names]
    regions = [ann[n].regions(t, (224, 224), pre) for n, t in zip(names, targets)]
    hits = {m: M.pointing_game(ex.explain(x, method=m, target=targets).maps, regions, 0.0).sum()
            for m in ("gradcam", "gradcam+ge")}
    assert hits["gradcam+ge"] >= hits["gradcam"], hits


# --- compare ----------------------------------------------------------------------------------------------

def test_compare_writes_one_grid(tmp_path):
    from onnx_saliency.cli.main import main

    model = tiny_classifier(tmp_path / "tiny.onnx")
    image = tmp_path / "cat.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    out = tmp_path / "grid.png"
    res = CliRunner().invoke(main, ["compare", str(model), str(image), "-m", "gradcam", "-m", "relevance-cam",
                                    "-m", "cmwp+ge", "-o", str(out), "--size", "32"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    # four cells (image + 3 methods) in one row, 4 px apart, each under a 22 px title; a method's 32-row panel
    # also has its colour convention above it (22 px) and its colour bar beside it, so cells are wider than 32
    h, w, _ = cv2.imread(str(out)).shape
    assert h == 32 + 22 + 22 and (w - 3 * 4) % 4 == 0 and (w - 3 * 4) // 4 > 32
    bad = tmp_path / "bad.png"
    res = CliRunner().invoke(main, ["compare", str(model), str(image), "-m", "gradcam", "-m", "nope", "-o", str(bad)])
    assert res.exit_code == 2 and "error: -m 'nope': unknown method" in res.output and not bad.exists()
    other = tmp_path / "dog.png"
    cv2.imwrite(str(other), np.zeros((16, 16, 3), np.uint8))
    res = CliRunner().invoke(main, ["compare", str(model), str(image), str(other), "-o", str(bad)])
    assert res.exit_code == 2 and "one image" in res.output


def test_reference_mode_is_named_in_the_sidecar(tmp_path):
    """--option reference=... reaches each seed method from the CLI and its JSON sidecar names it and the
    differences that remain (issue 17)."""
    import json

    from onnx_saliency.cli.main import main

    model = tiny_classifier(tmp_path / "tiny.onnx")
    image = tmp_path / "cat.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for method, value, word in (("tsgb", "true", "grouped"), ("gradcam+ge", "v2", "reference v2"),
                                ("relevance-cam", "true", "BatchNorm passes"), ("sr-map", "true", "max_unpool2d")):
        out = tmp_path / method
        args = ["explain", str(model), str(image), "-m", method, "--option", f"reference={value}", "--out", str(out)]
        if method == "sr-map":
            args += ["--option", "ca_resolution=16"]
        res = CliRunner().invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        side = json.loads(next(out.rglob("*.json")).read_text())
        assert str(side["options"]["reference"]).lower() == value, (method, side["options"])
        if method != "tsgb":  # the tiny net has no grouped conv: TSGB's reference graph is the default one
            assert any(word in n for n in side["notes"]), (method, side["notes"])
