"""LRP through the ops of ConvNeXt, ShuffleNet, Caffe-era and timm exports: which rule each op gets, and
conservation on built graphs (bias-free layers: the relevance reaching the input sums to the start).

Rules (graph_passes.lrp.compiler.base_rule): normalisers and pointwise nonlinearities pass relevance unchanged
(LXT's identity); data movement routes it like the gradient; max reductions are winner-take-all; interpolating
resizes and linear maps with one constant operand (Einsum, MatMul that is not a layer) are proportional;
ConvTranspose is a linear layer (every layer rule applies); an exported GELU / Mish is a gate.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graph_passes as gp
from graph_passes import lrp as R
from onnx_saliency import lrp
from onnx_saliency.engine import Engine
from onnx_saliency.errors import UnsupportedModelError
from onnx_saliency.intake.model import load_model
from tests.graphs import make_model, session


def _n(op, ins, outs, name=None, **kw):
    return helper.make_node(op, ins, outs, name=name or outs[0], **kw)


def _w(rng, *shape, scale=0.4):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def convnext_like(seed=0):
    """Stem conv, channels-last LayerNorm, depthwise conv, LayerNorm, MatMul MLP with torch's erf GELU, layer
    scale, residual Add, global pool, Gemm head: the ops of a legacy ConvNeXt export (bias-free)."""
    rng = np.random.default_rng(seed)
    inits = {"stem": _w(rng, 8, 3, 2, 2), "ln_s": rng.uniform(0.5, 1.5, 8).astype(np.float32),
             "ln_b": _w(rng, 8), "dw": _w(rng, 8, 1, 3, 3), "w1": _w(rng, 8, 16), "w2": _w(rng, 16, 8),
             "r2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5),
             "gamma": rng.uniform(0.5, 1.0, 8).astype(np.float32), "head": _w(rng, 5, 8)}
    nodes = [
        _n("Conv", ["x", "stem"], ["c0"], strides=[2, 2]),
        _n("Transpose", ["c0"], ["t0"], perm=[0, 2, 3, 1]),
        _n("LayerNormalization", ["t0", "ln_s", "ln_b"], ["ln0"], epsilon=1e-6),
        _n("Transpose", ["ln0"], ["s0"], perm=[0, 3, 1, 2]),
        _n("Conv", ["s0", "dw"], ["d1"], group=8, pads=[1, 1, 1, 1]),
        _n("Transpose", ["d1"], ["t1"], perm=[0, 2, 3, 1]),
        _n("LayerNormalization", ["t1", "ln_s", "ln_b"], ["ln1"], epsilon=1e-6),
        _n("MatMul", ["ln1", "w1"], ["h"]),
        _n("Div", ["h", "r2"], ["hd"]), _n("Erf", ["hd"], ["he"]), _n("Add", ["he", "one"], ["ha"]),
        _n("Mul", ["h", "ha"], ["hm"]), _n("Mul", ["hm", "half"], ["gelu"]),
        _n("MatMul", ["gelu", "w2"], ["h2"]),
        _n("Mul", ["h2", "gamma"], ["ls"]),
        _n("Transpose", ["ls"], ["t2"], perm=[0, 3, 1, 2]),
        _n("Add", ["s0", "t2"], ["res"]),
        _n("GlobalAveragePool", ["res"], ["gap"]), _n("Flatten", ["gap"], ["flat"]),
        _n("Gemm", ["flat", "head"], ["logits"], transB=1),
    ]
    return make_model(nodes, [("x", (None, 3, 8, 8))], [("logits", (None, 5))], inits)


def shufflenet_like(seed=0, legacy_slices=False):
    """Split (dynamo) or Slice (legacy) into two branches, Concat, the channel-shuffle Reshape/Transpose/Reshape,
    a Gather of channels, global max pooling."""
    rng = np.random.default_rng(seed)
    inits = {"w0": _w(rng, 8, 3, 3, 3), "w1": _w(rng, 4, 4, 1, 1), "parts": np.array([4, 4], np.int64),
             "g5": np.array([-1, 2, 4, 6, 6], np.int64), "g4": np.array([-1, 8, 6, 6], np.int64),
             "idx": np.array([0, 2, 5, 7, 7], np.int64), "head": _w(rng, 5, 5),
             "s0": np.array([0], np.int64), "s4": np.array([4], np.int64), "s8": np.array([8], np.int64),
             "ax1": np.array([1], np.int64)}
    split = ([_n("Slice", ["r0", "s0", "s4", "ax1"], ["a"]), _n("Slice", ["r0", "s4", "s8", "ax1"], ["b"])]
             if legacy_slices else [_n("Split", ["r0", "parts"], ["a", "b"], axis=1)])
    nodes = [
        _n("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]), _n("Relu", ["c0"], ["r0"]), *split,
        _n("Conv", ["b", "w1"], ["c1"]), _n("Relu", ["c1"], ["b2"]),
        _n("Concat", ["a", "b2"], ["cat"], axis=1),
        _n("Reshape", ["cat", "g5"], ["v5"]), _n("Transpose", ["v5"], ["v5t"], perm=[0, 2, 1, 3, 4]),
        _n("Reshape", ["v5t", "g4"], ["shuf"]),
        _n("Gather", ["shuf", "idx"], ["picked"], axis=1),
        _n("GlobalMaxPool", ["picked"], ["gmp"]), _n("Flatten", ["gmp"], ["flat"]),
        _n("MatMul", ["flat", "head"], ["logits"]),
    ]
    return make_model(nodes, [("x", (None, 3, 6, 6))], [("logits", (None, 5))], inits)


def assorted(seed=0):
    """LRN, ConvTranspose, nearest and bilinear Resize, InstanceNorm, GroupNorm, Mish, Softplus, Abs,
    SpaceToDepth/DepthToSpace, reflect Pad, ReduceMax + Expand, Max of two branches, Where between two
    activations, an Einsum with a constant weight (opset 21: GroupNormalization's current form)."""
    rng = np.random.default_rng(seed)
    inits = {"w0": _w(rng, 4, 3, 3, 3), "wt": _w(rng, 4, 4, 2, 2), "sc_down": np.array([1, 1, 0.5, 0.5], np.float32),
             "sc_up": np.array([1, 1, 2, 2], np.float32), "in_s": rng.uniform(0.5, 1.5, 4).astype(np.float32),
             "in_b": _w(rng, 4), "gn_s": rng.uniform(0.5, 1.5, 4).astype(np.float32), "gn_b": _w(rng, 4),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "ax3": np.array([3], np.int64),
             "shape": np.array([1, 1, 10, 10], np.int64), "zero": np.float32(0), "we": _w(rng, 4, 6),
             "head": _w(rng, 5, 6)}
    nodes = [
        _n("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]), _n("LRN", ["c0"], ["lrn"], size=3, alpha=0.1),
        _n("MaxPool", ["lrn"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),                    # (N, 4, 4, 4)
        _n("ConvTranspose", ["mp", "wt"], ["up"], strides=[2, 2]),                              # (N, 4, 8, 8)
        _n("Resize", ["up", "", "sc_down"], ["down"], mode="nearest"),                          # (N, 4, 4, 4)
        _n("InstanceNormalization", ["down", "in_s", "in_b"], ["inorm"]), _n("Mish", ["inorm"], ["mish"]),
        _n("Resize", ["mish", "", "sc_up"], ["bil"], mode="linear"),                            # (N, 4, 8, 8)
        _n("GroupNormalization", ["bil", "gn_s", "gn_b"], ["gn"], num_groups=2), _n("Abs", ["gn"], ["ab"]),
        _n("SpaceToDepth", ["ab"], ["s2d"], blocksize=2), _n("DepthToSpace", ["s2d"], ["d2s"], blocksize=2),
        _n("Pad", ["d2s", "pads"], ["pad"], mode="reflect"), _n("Softplus", ["pad"], ["sp"]),  # (N, 4, 10, 10)
        _n("ReduceMax", ["sp", "ax3"], ["rmax"], keepdims=1),                                  # (N, 4, 10, 1)
        _n("Expand", ["rmax", "shape"], ["ex"]),                                               # (N, 4, 10, 10)
        _n("Max", ["ex", "pad"], ["mx"]),
        _n("Greater", ["pad", "zero"], ["pos"]), _n("Where", ["pos", "mx", "sp"], ["wh"]),
        _n("Einsum", ["wh", "we"], ["ein"], equation="nchw,ck->nkhw"),                          # (N, 6, 10, 10)
        _n("GlobalAveragePool", ["ein"], ["gap"]), _n("Flatten", ["gap"], ["flat"]),
        _n("Gemm", ["flat", "head"], ["logits"], transB=1),
    ]
    return make_model(nodes, [("x", (None, 3, 8, 8))], [("logits", (None, 5))], inits, opset=21)


GRAPHS = {"convnext": (convnext_like, (3, 8, 8)), "shufflenet": (shufflenet_like, (3, 6, 6)),
          "shufflenet-legacy": (lambda: shufflenet_like(legacy_slices=True), (3, 6, 6)),
          "assorted": (assorted, (3, 8, 8))}


def _engine(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return Engine(load_model(path), threads=1)


def _x(shape, n=3, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _relerr(a, b):
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-12)


@pytest.mark.parametrize("graph,composite", [(g, "lrp0") for g in sorted(GRAPHS)] + [
    ("shufflenet", "zplus"), ("shufflenet-legacy", "zplus")])
def test_conservation_through_the_new_ops(tmp_path, graph, composite):
    """LRP-0 conserves exactly through every rule here; z+ does too where each layer's input is non-negative
    (on a signed input an output whose every x_i w_i has opposite signs has z+ = 0 and drops its relevance)."""
    build, shape = GRAPHS[graph]
    engine = _engine(build(), tmp_path)
    comp = lrp.uniform(R.LRP0() if composite == "lrp0" else R.ZPlus(), composite, stabilizer=0.0)
    out = lrp.relevance_at(engine, _x(shape), composite=comp)
    start = out["start"]
    total = out["relevance"]["x"].reshape(3, -1).astype(np.float64).sum(1)
    assert np.all(np.abs(start) > 1e-3) and np.isfinite(out["relevance"]["x"]).all()
    assert _relerr(total, start).max() < 1e-4, (graph, composite, total, start)


EXPECTED = {  # op -> the rule name base_rule gives it
    "LayerNormalization": "pass", "Erf": "pass", "Mish": "pass", "Softplus": "pass", "Abs": "pass",
    "LRN": "pass", "InstanceNormalization": "pass", "GroupNormalization": "pass",
    "Split": "gradient", "Slice": "gradient", "Gather": "gradient", "Expand": "gradient", "Where": "gradient",
    "SpaceToDepth": "gradient", "DepthToSpace": "gradient", "Pad": "gradient",
    "ReduceMax": "wta", "GlobalMaxPool": "wta", "Max": "wta", "MaxPool": "wta",
    "Einsum": "norm", "ConvTranspose": "lrp0",
}


def test_rule_report_names_each_new_ops_rule(tmp_path):
    seen = {}
    for graph, (build, _) in GRAPHS.items():
        engine = _engine(build(), tmp_path, f"{graph}.onnx")
        lines = lrp.rule_report(engine.model, lrp.uniform(R.LRP0(), "lrp0"))
        assert lines[-1] == "nodes without a rule: none", (graph, lines[-1])
        for line in lines:
            parts = line.split("\t")
            if len(parts) >= 3:
                seen.setdefault(parts[1], set()).add(parts[2].split("(")[0])
        # the per-op summary says why
        text = "\n".join(lines)
        if graph == "convnext":
            assert "LayerNormalization: pass x2 (identity: a normaliser" in text
            assert "Mul: gate x3" in text
        if graph == "assorted":
            assert "Resize: gradient x1 (nearest: routes like the gradient), norm x1" in text
    for op, rule in EXPECTED.items():
        assert rule in seen.get(op, set()), (op, seen.get(op))
    # the exported GELU: the Mul of h and its erf branch is a gate whose signal is h, the 0.5 a constant gate
    a = R.analyze(_engine(convnext_like(), tmp_path, "c2.onnx").model.canonical)
    assert a.gates["hm"] == 0 and a.gates["gelu"] == 0


def test_convtranspose_layer_rules_match_their_definition(tmp_path):
    """LRP-0 through a ConvTranspose layer is x * J^T (R / y), which append_vjp computes independently; z+ uses
    the positive weights: checked against a numpy ConvTranspose."""
    rng = np.random.default_rng(3)
    w = _w(rng, 3, 2, 3, 3)
    nodes = [_n("ConvTranspose", ["x", "w"], ["up"], strides=[2, 2], pads=[1, 1, 0, 0], output_padding=[1, 0]),
             _n("Relu", ["up"], ["r"]), _n("GlobalAveragePool", ["r"], ["g"]), _n("Flatten", ["g"], ["logits"])]
    model = make_model(nodes, [("x", (None, 3, 4, 4))], [("logits", (None, 2))], {"w": w})
    engine = _engine(model, tmp_path)
    x = np.abs(_x((3, 4, 4), n=2))
    comp = lrp.uniform(R.LRP0(), "lrp0", stabilizer=0.0)
    out = lrp.relevance_at(engine, x, composite=comp, at=["x", "up"], expose=["up"])
    r_up = out["relevance"]["up"]
    y = out["up"]
    vjp = gp.append_vjp(model, "up", ["x"])
    s = np.divide(r_up, y, out=np.zeros_like(y), where=y != 0)  # LRP-0 without stabiliser: 0 where z = 0
    jt = session(vjp).run([gp.grad_name("x")], {"x": x, "up__seed": s})[0]
    np.testing.assert_allclose(out["relevance"]["x"], x * jt, rtol=1e-4, atol=1e-6)
    # z+: the same with w+ (x >= 0 here, so z = W+ x)
    zp = lrp.relevance_at(engine, x, composite=lrp.uniform(R.ZPlus(1e-9), "zplus", stabilizer=0.0),
                          at=["x", "up"], expose=["up"])
    pos = make_model(nodes[:1], [("x", (None, 3, 4, 4))], [("up", (None, 2, 9, 8))], {"w": np.maximum(w, 0)})
    z = session(pos).run(["up"], {"x": x})[0]
    jt = session(gp.append_vjp(pos, "up", ["x"])).run([gp.grad_name("x")],
                                                      {"x": x, "up__seed": zp["relevance"]["up"] / (z + 1e-9)})[0]
    np.testing.assert_allclose(zp["relevance"]["x"], x * jt, rtol=1e-4, atol=1e-6)


def test_products_of_activations_take_attnlrps_rules(tmp_path):
    """Attention's softmax(q k^T) v and a product of two unrelated branches: the uniform rule (half of the
    relevance to each operand, so the node conserves), the Softmax its z-rule through its Jacobian; CP-LRP holds
    the attention probabilities fixed, so nothing reaches the Softmax and `mix` hands all its relevance to q."""
    rng = np.random.default_rng(4)
    nodes = [_n("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), _n("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1]),
             _n("Mul", ["a", "b"], ["ab"], name="branch_product"),
             _n("Reshape", ["ab", "flat_hw"], ["q"]), _n("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
             _n("MatMul", ["q", "qt"], ["attn"], name="scores"),
             _n("Softmax", ["attn"], ["p"], axis=-1, name="softmax"),
             _n("MatMul", ["p", "q"], ["o"], name="mix"), _n("ReduceMean", ["o", "ax"], ["logits"], keepdims=0)]
    model = make_model(nodes, [("x", (None, 3, 4, 4))], [("logits", (None, 4))],
                       {"w1": _w(rng, 4, 3, 3, 3), "w2": _w(rng, 4, 3, 3, 3), "flat_hw": np.array([0, 4, 16], np.int64),
                        "ax": np.array([2], np.int64)}, opset=18)
    engine = _engine(model, tmp_path)
    x = _x((3, 4, 4))
    rows = {r["node"]: r for r in lrp.conservation_table(engine, x, composite="epsilon")}
    assert rows["mix"]["rule"].startswith("uniform") and rows["softmax"]["rule"].startswith("norm")
    for name in ("branch_product", "scores", "mix"):
        r = rows[name]
        np.testing.assert_allclose(r["in"], r["out"], rtol=1e-4, atol=1e-6 * np.abs(r["out"]).max())
    cp = {r["node"]: r for r in lrp.conservation_table(engine, x, composite="cp-lrp")}
    assert "softmax" not in cp and "scores" not in cp  # no relevance reaches them
    np.testing.assert_allclose(cp["mix"]["in"], cp["mix"]["out"], rtol=1e-4, atol=1e-6)
    assert not np.allclose(cp["branch_product"]["out"], rows["branch_product"]["out"])


def test_decomposed_gelu_and_mish_variants_are_gates():
    """The exporters' spellings: x * (erf(x/sqrt 2) + 1) * 0.5 with a bias Add before it (legacy ConvNeXt),
    (0.5 x) * (1 + erf(..)), the tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), and Mish as
    x * tanh(softplus(x)); a product of two convolutions is not a gate."""
    rng = np.random.default_rng(5)
    c = {"w": _w(rng, 4, 3, 1, 1), "w2": _w(rng, 4, 3, 1, 1), "b": _w(rng, 1, 4, 1, 1), "r2": np.float32(1.41),
         "one": np.float32(1), "half": np.float32(0.5), "k": np.float32(0.79), "cube": np.float32(3),
         "a": np.float32(0.044715)}
    nodes = [
        _n("Conv", ["x", "w"], ["cv"]), _n("Add", ["b", "cv"], ["h"]),                       # bias Add first
        _n("Div", ["h", "r2"], ["d"]), _n("Erf", ["d"], ["e"]), _n("Add", ["e", "one"], ["e1"]),
        _n("Mul", ["h", "e1"], ["legacy"]), _n("Mul", ["legacy", "half"], ["g1"]),
        _n("Mul", ["half", "g1"], ["hx"]), _n("Erf", ["g1"], ["e2"]), _n("Add", ["one", "e2"], ["e3"]),
        _n("Mul", ["hx", "e3"], ["scaled_first"]),
        _n("Pow", ["scaled_first", "cube"], ["p3"]), _n("Mul", ["a", "p3"], ["ap"]),
        _n("Add", ["scaled_first", "ap"], ["inner"]), _n("Mul", ["inner", "k"], ["ik"]), _n("Tanh", ["ik"], ["t"]),
        _n("Add", ["t", "one"], ["t1"]), _n("Mul", ["scaled_first", "half"], ["hs"]),
        _n("Mul", ["hs", "t1"], ["tanh_gelu"]),
        _n("Softplus", ["tanh_gelu"], ["sp"]), _n("Tanh", ["sp"], ["tsp"]), _n("Mul", ["tsp", "tanh_gelu"], ["mish"]),
        _n("Conv", ["x", "w2"], ["other"]), _n("Mul", ["mish", "other"], ["product"]),
        _n("GlobalAveragePool", ["product"], ["gap"]), _n("Flatten", ["gap"], ["logits"]),
    ]
    model = make_model(nodes, [("x", (None, 3, 4, 4))], [("logits", (None, 4))], c)
    a = R.analyze(model)
    assert a.gates["legacy"] == 0 and a.gates["scaled_first"] == 0 and a.gates["tanh_gelu"] == 0
    assert a.gates["mish"] == 1 and a.gates["g1"] == 0
    assert "product" not in a.gates


def test_bias_add_written_bias_first_is_a_tail_either_way(tmp_path):
    """torch's legacy exporter writes a Linear as Add(bias, MatMul(x, W)): the tail's relevance must reach the
    MatMul whichever side of the Add it is on (it used to go to the bias and vanish)."""
    rng = np.random.default_rng(6)
    inits = {"w0": _w(rng, 4, 3, 3, 3), "w": _w(rng, 4, 6), "bias": _w(rng, 6), "head": _w(rng, 6, 3)}
    outs = []
    for order in (["bias", "mm"], ["mm", "bias"]):
        nodes = [_n("Conv", ["x", "w0"], ["c"]), _n("Relu", ["c"], ["r"]),
                 _n("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]), _n("MatMul", ["t", "w"], ["mm"]),
                 _n("Add", order, ["lin"]), _n("ReduceMean", ["lin"], ["m"], axes=[1, 2], keepdims=0),
                 _n("MatMul", ["m", "head"], ["logits"])]
        model = make_model(nodes, [("x", (None, 3, 5, 5))], [("logits", (None, 3))], inits)
        engine = _engine(model, tmp_path, f"{order[0]}.onnx")
        outs.append(lrp.relevance_at(engine, _x((3, 5, 5)), composite="epsilon")["relevance"]["x"])
    assert np.abs(outs[0]).sum() > 0
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["ReduceL1", "ReduceL2"])
def test_norm_reductions_conserve(tmp_path, op):
    """A pooled L1 / L2 norm (timm's and Swin-V2's normalisations reduce this way): the proportional rule
    through the op's gradient gives |x_i| R / |x|_1 and x_i^2 R / |x|_2^2, which sum to R."""
    rng = np.random.default_rng(7)
    nodes = [_n("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), _n(op, ["c", "ax"], ["pooled"], keepdims=0),
             _n("Gemm", ["pooled", "head"], ["logits"], transB=1)]
    model = make_model(nodes, [("x", (None, 3, 5, 5))], [("logits", (None, 3))],
                       {"w": _w(rng, 4, 3, 3, 3), "ax": np.array([2, 3], np.int64), "head": _w(rng, 3, 4)}, opset=18)
    engine = _engine(model, tmp_path)
    out = lrp.relevance_at(engine, _x((3, 5, 5)), composite=lrp.uniform(R.LRP0(), "lrp0", stabilizer=0.0))
    total = out["relevance"]["x"].reshape(3, -1).astype(np.float64).sum(1)
    assert _relerr(total, out["start"]).max() < 1e-4


def _squeeze_excite(decomposed: bool, seed=6):
    """conv -> relu -> squeeze-excitation (global mean, two 1x1 convs, hard sigmoid) -> gap -> dense; the hard
    sigmoid as the op (torch exports) or as Keras exports it: Clip(z + 3, 0, 6) * (1/6)."""
    rng = np.random.default_rng(seed)
    c = {"w": _w(rng, 4, 3, 3, 3), "s1": _w(rng, 2, 4, 1, 1), "s2": _w(rng, 4, 2, 1, 1), "fc": _w(rng, 4, 5),
         "three": np.float32(3), "zero": np.float32(0), "six": np.float32(6), "sixth": np.float32(1 / 6)}
    nodes = [_n("Conv", ["x", "w"], ["cv"], pads=[1, 1, 1, 1]), _n("Relu", ["cv"], ["h"]),
             _n("ReduceMean", ["h"], ["sq"], axes=[2, 3], keepdims=1), _n("Conv", ["sq", "s1"], ["e1"]),
             _n("Relu", ["e1"], ["e1r"]), _n("Conv", ["e1r", "s2"], ["z"])]
    if decomposed:
        nodes += [_n("Add", ["z", "three"], ["z3"]), _n("Clip", ["z3", "zero", "six"], ["zc"]),
                  _n("Mul", ["zc", "sixth"], ["gate"])]
    else:
        nodes += [_n("HardSigmoid", ["z"], ["gate"], alpha=1 / 6, beta=0.5)]
    nodes += [_n("Mul", ["h", "gate"], ["se"]), _n("GlobalAveragePool", ["se"], ["gap"]),
              _n("Flatten", ["gap"], ["f"]), _n("MatMul", ["f", "fc"], ["logits"])]
    return make_model(nodes, [("x", (None, 3, 6, 6))], [("logits", (None, 5))], c, opset=17)


def test_squeeze_excitation_gate_is_held_fixed_whichever_way_hard_sigmoid_is_written(tmp_path):
    """The SE Mul is a gate (all relevance to the signal) both for HardSigmoid and for Keras's
    Clip(z + 3, 0, 6) / 6, so a torch and a Keras export of one network explain alike."""
    maps = {}
    for decomposed in (False, True):
        model = _squeeze_excite(decomposed)
        se_mul = next(n.name for n in model.graph.node if n.output[0] == "se")
        assert R.analyze(model).gates[se_mul] == 0
        engine = _engine(model, tmp_path, f"se{int(decomposed)}.onnx")
        out = lrp.relevance_at(engine, _x((3, 6, 6)), composite="epsilon-plus-flat")
        maps[decomposed] = out["relevance"]["x"]
    np.testing.assert_allclose(maps[True], maps[False], rtol=1e-4, atol=1e-6 * np.abs(maps[False]).max())


def test_einsum_of_two_activations_takes_the_uniform_rule(tmp_path):
    """Q K^T and A V written as Einsum (MaxViT's exports): the uniform rule as for MatMul, each node conserves
    and the map equals the MatMul spelling's."""
    rng = np.random.default_rng(7)
    inits = {"w1": _w(rng, 4, 3, 3, 3), "flat_hw": np.array([0, 4, 16], np.int64), "ax": np.array([2], np.int64)}

    def build(einsum):
        head = [_n("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), _n("Reshape", ["a", "flat_hw"], ["q"])]
        if einsum:
            body = [_n("Einsum", ["q", "q"], ["attn"], name="scores", equation="bcd,bed->bce"),
                    _n("Softmax", ["attn"], ["p"], axis=-1, name="softmax"),
                    _n("Einsum", ["p", "q"], ["o"], name="mix", equation="bce,bed->bcd")]
        else:
            body = [_n("Transpose", ["q"], ["qt"], perm=[0, 2, 1]), _n("MatMul", ["q", "qt"], ["attn"], name="scores"),
                    _n("Softmax", ["attn"], ["p"], axis=-1, name="softmax"), _n("MatMul", ["p", "q"], ["o"], name="mix")]
        nodes = head + body + [_n("ReduceMean", ["o", "ax"], ["logits"], keepdims=0)]
        return make_model(nodes, [("x", (None, 3, 4, 4))], [("logits", (None, 4))], inits, opset=18)

    x = _x((3, 4, 4))
    maps = {}
    for einsum in (True, False):
        engine = _engine(build(einsum), tmp_path, f"e{int(einsum)}.onnx")
        rows = {r["node"]: r for r in lrp.conservation_table(engine, x, composite="epsilon")}
        assert rows["mix"]["rule"].startswith("uniform")
        for name in ("scores", "mix"):
            np.testing.assert_allclose(rows[name]["in"], rows[name]["out"], rtol=1e-4,
                                       atol=1e-6 * np.abs(rows[name]["out"]).max())
        maps[einsum] = lrp.relevance_at(engine, x, composite="epsilon")["relevance"]["x"]
    np.testing.assert_allclose(maps[True], maps[False], rtol=1e-4, atol=1e-5 * np.abs(maps[False]).max())
