"""TSGB against a numpy reference written from methods-spec section 3.1, on built graphs; the zero-sum property
of TSGB-FC; folded and unfolded BatchNorm / bias Add agree; the shared models give finite, non-constant maps."""

import numpy as np
import onnx
import pytest
from onnx import helper

import graph_passes as gp
from graph_passes.tsgb import append_tsgb
from onnx_saliency import Explainer, SaliencyError
from tests.graphs import make_model, session

EPS = 1e-10
CLASSES = 5


def _w(rng, *shape, scale=0.4):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _save(model, path):
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="raw"))
    onnx.save(model, path)
    return path


# --- numpy reference ----------------------------------------------------------------------------------------

def conv_np(x, w, b, stride=1, pad=0, group=1):
    n, c, h, wd = x.shape
    m, cg, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, m, oh, ow))
    mg = m // group
    for o in range(m):
        chans = slice((o // mg) * cg, (o // mg + 1) * cg)
        for i in range(k):
            for j in range(k):
                patch = xp[:, chans, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j])
    return out + (0 if b is None else b[None, :, None, None])


def tsgb_conv_np(x, y, g, k, stride=1, pad=0, group=1):
    """g-hat_c(p) = sign(x_c(p)) sum_{o: p in RF(o)} R(o) / (Z(o) + eps), per group, loops over outputs."""
    n, c, h, wd = x.shape
    m = y.shape[1]
    cg, mg = c // group, m // group
    acc = np.zeros((n, c, h + 2 * pad, wd + 2 * pad))
    absx = np.pad(np.abs(x), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    for b in range(n):
        for gr in range(group):
            chans = slice(gr * cg, (gr + 1) * cg)
            for oh in range(y.shape[2]):
                for ow in range(y.shape[3]):
                    rows, cols = slice(oh * stride, oh * stride + k), slice(ow * stride, ow * stride + k)
                    rel = (g[b, gr * mg:(gr + 1) * mg, oh, ow] * y[b, gr * mg:(gr + 1) * mg, oh, ow]).sum()
                    z = absx[b, chans, rows, cols].sum()
                    acc[b, chans, rows, cols] += rel / (z + EPS)
    return np.sign(x) * acc[:, :, pad:pad + h, pad:pad + wd]


def tsgb_fc_np(f, w, target):
    """w: (classes, inputs). One-hot target: g-hat = w+_c + beta_c w-_c, beta_c = P_c / |Q_c|."""
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    p, q = (f * wp[target]).sum(1), (f * wn[target]).sum(1)
    return wp[target] + (p / np.abs(q))[:, None] * wn[target]


def maxpool_route(x, g, k=2):
    out = np.zeros_like(x)
    n, c, h, w = g.shape
    for b in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    win = x[b, ch, i * k:(i + 1) * k, j * k:(j + 1) * k]
                    a, bb = np.unravel_index(np.argmax(win), win.shape)
                    out[b, ch, i * k + a, j * k + bb] += g[b, ch, i, j]
    return out


def bn_np(x, gamma, beta, mean, var, eps=1e-5):
    s = gamma / np.sqrt(var + eps)
    return x * s[None, :, None, None] + (beta - mean * s)[None, :, None, None]


# --- built graph --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return build_net(tmp_path_factory.mktemp("tsgb"))


def build_net(folder):
    """conv -> relu -> maxpool -> BN (kept: after a pool) -> depthwise conv -> relu -> residual Add (with the pool)
    -> AveragePool 2x2 (local) -> 1x1 conv -> relu -> GAP -> flatten -> gemm."""
    rng = np.random.default_rng(1)
    p = {"w1": _w(rng, 4, 3, 3, 3), "b1": _w(rng, 4, scale=0.1), "w2": _w(rng, 4, 1, 3, 3), "b2": _w(rng, 4, scale=0.1),
         "w3": _w(rng, 6, 4, 1, 1), "b3": _w(rng, 6, scale=0.1), "fc": _w(rng, CLASSES, 6, scale=1.0),
         "fcb": _w(rng, CLASSES, scale=0.1), "gamma": (1 + 0.3 * rng.standard_normal(4)).astype(np.float32),
         "beta": _w(rng, 4, scale=0.2), "mean": _w(rng, 4, scale=0.2),
         "var": (0.5 + rng.random(4)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("BatchNormalization", ["p1", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Conv", ["bn", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=4, name="conv_dw"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Add", ["a2", "p1"], ["res"], name="residual"),
        helper.make_node("AveragePool", ["res"], ["ap"], kernel_shape=[2, 2], strides=[2, 2], name="avgpool"),
        helper.make_node("Conv", ["ap", "w3", "b3"], ["c3"], name="conv_1x1"),
        helper.make_node("Relu", ["c3"], ["a3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["a3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    model = make_model(nodes, [("input", (None, 3, 12, 12))], [("logits", (None, CLASSES))], p)
    path = _save(model, folder / "net.onnx")
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    return dict(path=path, x=x, p={k: v.astype(np.float64) for k, v in p.items()})


def reference_map(x, p, targets, group=4):
    x = x.astype(np.float64)
    c1 = conv_np(x, p["w1"], p["b1"], pad=1)
    a1 = np.maximum(c1, 0)
    p1 = a1.reshape(len(x), 4, 6, 2, 6, 2).max(axis=(3, 5))
    bn = bn_np(p1, p["gamma"], p["beta"], p["mean"], p["var"])
    c2 = conv_np(bn, p["w2"], p["b2"], pad=1, group=4)
    a2 = np.maximum(c2, 0)
    res = a2 + p1
    ap = res.reshape(len(x), 4, 3, 2, 3, 2).mean(axis=(3, 5))
    c3 = conv_np(ap, p["w3"], p["b3"])
    a3 = np.maximum(c3, 0)
    flat = a3.mean(axis=(2, 3))
    logits = flat @ p["fc"].T + p["fcb"]
    targets = np.where(targets < 0, logits.argmax(1), targets)
    g_flat = tsgb_fc_np(flat, p["fc"], targets)
    g_c3 = np.broadcast_to(g_flat[:, :, None, None] / 9, a3.shape) * (c3 > 0)
    g_ap = tsgb_conv_np(ap, c3, g_c3, k=1)
    share = np.repeat(np.repeat(g_ap * ap / 4, 2, axis=2), 2, axis=3)
    g_res = share / (res + EPS)
    g_c2 = g_res * (c2 > 0)
    g_bn = tsgb_conv_np(bn, c2, g_c2, k=3, pad=1, group=group)
    g_p1 = g_res + g_bn * bn / (p1 + EPS)
    g_c1 = maxpool_route(a1, g_p1) * (c1 > 0)
    g_x = tsgb_conv_np(x, c1, g_c1, k=3, pad=1)
    return (x * g_x).sum(1), targets, flat, g_flat


def test_tsgb_matches_numpy_reference(net):
    ex = Explainer(net["path"])
    for targets in (np.array([-1, -1, -1]), np.array([0, 3, 4])):
        r = ex.explain(net["x"], method="tsgb", target=list(targets))
        ref, resolved, _, _ = reference_map(net["x"], net["p"], targets)
        assert list(r.targets) == list(resolved) and r.signed
        assert r.maps.shape == (3, 12, 12)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(r.maps, ref, rtol=1e-3, atol=1e-4 * scale)
        np.testing.assert_allclose(r.attributions.sum(1), r.maps, rtol=1e-5, atol=1e-7 * scale)
    assert r.notes[0] == "TSGB-FC on fc (Gemm)" and "within each group" in r.notes[1]


def test_tsgb_reference_ignores_the_groups_as_the_authors_code(net):
    """reference=true: the grouped conv redistributes over all its channels (the reference's slim backward)."""
    ex = Explainer(net["path"])
    targets = np.array([0, 3, 4])
    r = ex.explain(net["x"], method="tsgb", target=list(targets), reference="true")
    ref, _, _, _ = reference_map(net["x"], net["p"], targets, group=1)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(r.maps, ref, rtol=1e-3, atol=1e-4 * scale)
    per_group, _, _, _ = reference_map(net["x"], net["p"], targets)
    assert np.abs(per_group - ref).max() > 1e-2 * scale  # the two differ on this net
    assert r.options["reference"] == "true" and "over all channels" in r.notes[1]


def test_tsgb_fc_rectified_contribution_sums_to_zero(net):
    """sum_i x_i g-hat_i = P - P = 0 at the classifier input wherever the target has negative evidence (Q < 0);
    with none (Q = 0, beta undefined in the reference) g-hat falls back to w+."""
    _, _, flat, _ = reference_map(net["x"], net["p"], np.array([-1, -1, -1]))
    w = net["p"]["fc"]
    P, Q = flat @ np.maximum(w, 0).T, flat @ np.minimum(w, 0).T
    both = np.minimum(P, -Q)
    targets = both.argmax(1)  # per image the class with the most positive and negative evidence
    fallback = int(np.argmin(np.where(Q[2] == 0, -P[2], np.inf)))  # image 2: a class with Q = 0 and P > 0
    assert (both.max(1) > 0).all() and Q[2, fallback] == 0 and P[2, fallback] > 0
    ex = Explainer(net["path"])
    m = gp.append_target_seed(gp.expose_tensors(ex.model.canonical, ["logits", "flat"]), "logits")
    m = append_tsgb(m, "logits", ["flat"], seed=gp.SEED)
    for tg in (targets, np.array([targets[0], targets[1], fallback])):
        f, g = session(m).run(["flat", gp.grad_name("flat")], {"input": net["x"], gp.TARGETS_INPUT: tg})
        np.testing.assert_allclose(f, flat, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g[:2], tsgb_fc_np(flat[:2], w, tg[:2]), rtol=1e-5, atol=1e-6)
        total, size = (f * g).sum(1), np.abs(f * g).sum(1)
        assert (size[:2] > 0).all() and (np.abs(total[:2]) < 1e-5 * size[:2]).all(), total
    np.testing.assert_allclose(g[2], np.maximum(w[fallback], 0), rtol=1e-6)
    assert total[2] > 0


def _conv_classifier_graph():
    rng = np.random.default_rng(4)
    inits = {"w1": _w(rng, 6, 3, 3, 3), "b1": _w(rng, 6, scale=0.1), "wc": _w(rng, CLASSES, 6, 1, 1),
             "bc": _w(rng, CLASSES, scale=0.1)}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "wc", "bc"], ["cc"], name="classifier"),
        helper.make_node("Relu", ["cc"], ["ac"], name="relu_c"),
        helper.make_node("GlobalAveragePool", ["ac"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["logits"], name="flatten"),
    ]
    return make_model(nodes, [("input", (None, 3, 8, 8))], [("logits", (None, CLASSES))], inits), inits


def test_conv_classifier_gets_tsgb_fc_per_position(tmp_path):
    """SqueezeNet-style head: g-hat = gate (w+ + beta w-) per position, and sum_c a1 * g-hat = 0 wherever Q < 0."""
    model, p = _conv_classifier_graph()
    path = _save(model, tmp_path / "sq.onnx")
    ex = Explainer(path)
    m = gp.append_target_seed(gp.expose_tensors(ex.model.canonical, ["logits", "a1", "cc"]), "logits")
    m = append_tsgb(m, "logits", ["a1"], seed=gp.SEED)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    a1, cc, g, tc = session(m).run(["a1", "cc", gp.grad_name("a1"), gp.RESOLVED],
                                   {"input": x, gp.TARGETS_INPUT: np.array([1, 3])})
    w = p["wc"][:, :, 0, 0].astype(np.float64)
    for b, t in enumerate(tc):
        wp, wn = np.maximum(w[t], 0), np.minimum(w[t], 0)
        P = np.einsum("chw,c->hw", a1[b].astype(np.float64), wp)
        Q = np.einsum("chw,c->hw", a1[b].astype(np.float64), wn)
        beta = np.where(Q != 0, P / np.where(Q != 0, np.abs(Q), 1), 0)
        gate = (cc[b, t] > 0) / 64.0
        want = gate[None] * (wp[:, None, None] + beta[None] * wn[:, None, None])
        np.testing.assert_allclose(g[b], want, rtol=1e-4, atol=1e-7)
        contribution = a1[b] * g[b]
        cancels = (Q < 0) & (gate > 0)  # positions with negative evidence; elsewhere beta = 0 (w+ only)
        zero_sum = np.abs(contribution.sum(0)) < 1e-5 * np.abs(contribution).sum(0).max()
        assert cancels.sum() > 10 and zero_sum[cancels].all()
    r = ex.explain(x, method="tsgb", target=[1, 3])
    assert r.notes == ["TSGB-FC on classifier (Conv, per position)"]
    assert np.isfinite(r.maps).all() and np.ptp(r.maps) > 0


def _bn_graph(variant):
    """conv -> [BN | bias Add | nothing, folded into the conv] -> relu -> GAP -> flatten -> gemm."""
    rng = np.random.default_rng(7)
    w, b = _w(rng, 8, 3, 3, 3), _w(rng, 8, scale=0.2)
    gamma, beta = (1 + 0.3 * rng.standard_normal(8)).astype(np.float32), _w(rng, 8, scale=0.2)
    mean, var = _w(rng, 8, scale=0.2), (0.5 + rng.random(8)).astype(np.float32)
    fc = _w(rng, CLASSES, 8, scale=1.0)
    s = gamma / np.sqrt(var + 1e-5)
    inits = {"fc": fc}
    head = [helper.make_node("Relu", ["y"], ["a"], name="relu"),
            helper.make_node("GlobalAveragePool", ["a"], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc")]
    if variant == "bn":
        inits.update(w=w, b=b, gamma=gamma, beta=beta, mean=mean, var=var)
        body = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    elif variant == "bias_add":
        inits.update(w=(w * s[:, None, None, None]).astype(np.float32),
                     b=((b - mean) * s + beta).astype(np.float32).reshape(1, 8, 1, 1))
        body = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                helper.make_node("Add", ["c", "b"], ["y"], name="bias")]
    else:
        inits.update(w=(w * s[:, None, None, None]).astype(np.float32), b=((b - mean) * s + beta).astype(np.float32))
        body = [helper.make_node("Conv", ["input", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    return make_model(body + head, [("input", (None, 3, 8, 8))], [("logits", (None, CLASSES))], inits)


def test_unfolded_batchnorm_and_bias_add_give_the_folded_map():
    """The output/input rule conserves g*y, so TSGB-Conv sees the same R(o) as with the affine folded in."""
    x = np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32)
    maps = {}
    for variant in ("folded", "bn", "bias_add"):
        m = gp.canonicalize(_bn_graph(variant), fold_bn=False)
        ops = [n.op_type for n in m.graph.node]
        assert ("BatchNormalization" in ops) == (variant == "bn") and ("Add" in ops) == (variant == "bias_add")
        m = append_tsgb(gp.append_target_seed(m, "logits"), "logits", ["input"], seed=gp.SEED)
        g, = session(m).run([gp.grad_name("input")], {"input": x, gp.TARGETS_INPUT: np.array([-1, 2])})
        maps[variant] = (x * g).sum(1)
    scale = np.abs(maps["folded"]).max()
    assert (np.abs(maps["folded"]).max(axis=(1, 2)) > 0).all()
    np.testing.assert_allclose(maps["bn"], maps["folded"], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(maps["bias_add"], maps["folded"], rtol=1e-4, atol=1e-5 * scale)


def test_classifier_option(net):
    ex = Explainer(net["path"])
    r = ex.explain(net["x"][:1], method="tsgb", classifier="conv_1x1")
    assert r.options["classifier"] == ["conv_1x1"] and "per position" in r.notes[0]
    with pytest.raises(SaliencyError, match="tsgb --option classifier: relu1: not a Conv/Gemm/MatMul"):
        ex.explain(net["x"][:1], method="tsgb", classifier="relu1")


@pytest.mark.shared
@pytest.mark.parametrize("name,classifier", [("squeezenet1_1", "Conv, per position"), ("efficientnet_lite0", "Gemm"),
                                             ("efficientnet_lite0_bn", "Gemm"), ("open_nsfw", "MatMul")])
def test_tsgb_on_shared_models(shared, name, classifier):
    ex = Explainer(shared / "models" / f"{name}.onnx", threads=2)
    r = ex.explain(shared / "images" / "darknet" / "dog.jpg", method="tsgb")
    assert r.maps.shape == (1, 224, 224) and np.isfinite(r.maps).all() and np.ptp(r.maps) > 0
    assert classifier in r.notes[0]
