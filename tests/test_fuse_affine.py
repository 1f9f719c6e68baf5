"""fuse_affine passes: bias Adds, MatMul heads and decomposed BatchNorms fold into their layer, exactly."""

import numpy as np
import onnx
import pytest
from onnx import helper

import graph_passes as gp
from graph_passes import fuse_affine as fa
from tests.graphs import make_model, session
from tests.twins import to_fp16_weights, twin_a, twin_b, weights

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)


def _r(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _outputs(model, x=X):
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _same_outputs(before, after, x=X):
    for a, b in zip(_outputs(before, x), _outputs(after, x)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def conv_then(ops_and_consts, extra_init=None):
    """input -> Conv(no bias) -> [op(const)]* -> output, the consts given as arrays."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["t0"], pads=[1, 1, 1, 1], name="conv")]
    inits = {"w": _r(4, 3, 3, 3)}
    for i, (op, value, const_first) in enumerate(ops_and_consts):
        inits[f"k{i}"] = value
        ins = [f"k{i}", f"t{i}"] if const_first else [f"t{i}", f"k{i}"]
        nodes.append(helper.make_node(op, ins, [f"t{i + 1}"], name=f"{op.lower()}{i}"))
    out = f"t{len(ops_and_consts)}"
    inits.update(extra_init or {})
    return make_model(nodes, [("input", (None, 3, 8, 8))], [(out, (None, 4, 8, 8))], inits)


def test_passes_return_new_checked_models_and_leave_the_input_alone():
    model = conv_then([("Add", _r(1, 4, 1, 1), False), ("Mul", _r(4, 1, 1), False)])
    before = model.SerializeToString()
    for fn in (gp.merge_bias_add, gp.fold_scale_shift, gp.matmul_add_to_gemm, fa.fuse_affine):
        out = fn(model)
        assert out is not model
        onnx.checker.check_model(out)
    assert model.SerializeToString() == before


def test_bias_add_merges_into_conv_and_gemm():
    conv = conv_then([("Add", _r(1, 4, 1, 1), False)])
    log = []
    merged = gp.merge_bias_add(conv, log)
    assert _ops(merged) == ["Conv"] and log == ["folded Add add0 into Conv conv"]
    _same_outputs(conv, merged)

    nodes = [helper.make_node("Gemm", ["input", "w"], ["y"], transB=1, name="fc"),
             helper.make_node("Add", ["b", "y"], ["out"], name="bias")]
    gemm = make_model(nodes, [("input", (None, 6))], [("out", (None, 3))], {"w": _r(3, 6), "b": _r(3)})
    merged = gp.merge_bias_add(gemm)
    assert _ops(merged) == ["Gemm"] and len(merged.graph.node[0].input) == 3
    _same_outputs(gemm, merged, _r(5, 6))


def test_a_constant_that_is_not_per_channel_stays():
    model = conv_then([("Add", _r(8), False)])  # (W,) broadcasts along the width, not the channels
    log = []
    out = gp.merge_bias_add(model, log)
    assert _ops(out) == ["Conv", "Add"]
    assert log == ["kept Add add0 (per-channel constant): constant is not per-channel"]
    _same_outputs(model, out)


def test_decomposed_batchnorm_folds_into_the_conv_exactly():
    scale, mean, beta = (1 + 0.2 * rng.random((4, 1, 1))).astype(np.float32), _r(4, 1, 1), _r(1, 4, 1, 1)
    model = conv_then([("Add", _r(4, 1, 1), True), ("Sub", mean, False), ("Mul", scale, True),
                       ("Div", (1 + rng.random((1, 4, 1, 1))).astype(np.float32), False), ("Add", beta, False)])
    log = []
    out = gp.fold_scale_shift(model, log)
    assert _ops(out) == ["Conv"], _ops(out)
    assert len(log) == 5 and all(line.startswith("folded ") for line in log)
    _same_outputs(model, out)


def test_constant_first_sub_and_div_cannot_fold():
    model = conv_then([("Sub", _r(1, 4, 1, 1), True)])
    assert _ops(gp.fold_scale_shift(model)) == ["Conv", "Sub"]


def test_per_channel_mul_add_without_a_foldable_producer_stays():
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "s"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "t"], ["out"], name="shift")]
    model = make_model(nodes, [("input", (None, 3, 8, 8))], [("out", (None, 4, 6, 6))],
                       {"w": _r(4, 3, 3, 3), "s": _r(1, 4, 1, 1), "t": _r(1, 4, 1, 1)})
    log = []
    out = fa.fuse_affine(model, log)
    assert _ops(out) == ["Conv", "Relu", "Mul", "Add"]
    assert any(line.startswith("kept Mul scale") and "Relu relu is not a Conv/Gemm" in line for line in log)
    _same_outputs(model, out)


def test_a_layer_output_with_two_consumers_is_not_folded():
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "b"], ["y"], name="bias"),
             helper.make_node("Relu", ["c"], ["z"], name="side")]
    model = make_model(nodes, [("input", (None, 3, 8, 8))], [("y", (None, 4, 6, 6)), ("z", (None, 4, 6, 6))],
                       {"w": _r(4, 3, 3, 3), "b": _r(1, 4, 1, 1)})
    assert _ops(gp.merge_bias_add(model)) == ["Conv", "Add", "Relu"]


def test_shared_weights_get_fresh_initializers():
    nodes = [helper.make_node("Conv", ["input", "w"], ["a"], name="conv_a"),
             helper.make_node("Mul", ["a", "s"], ["a2"], name="scale"),
             helper.make_node("Conv", ["input", "w"], ["b"], name="conv_b"),
             helper.make_node("Add", ["a2", "b"], ["out"], name="sum")]
    model = make_model(nodes, [("input", (None, 3, 8, 8))], [("out", (None, 4, 6, 6))],
                       {"w": _r(4, 3, 3, 3), "s": _r(1, 4, 1, 1)})
    out = gp.fold_scale_shift(model)
    assert _ops(out) == ["Conv", "Conv", "Add"]
    conv_b = next(n for n in out.graph.node if n.name == "conv_b")
    assert conv_b.input[1] == "w"
    _same_outputs(model, out)


def test_matmul_add_head_becomes_gemm_and_3d_matmul_stays():
    nodes = [helper.make_node("MatMul", ["input", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["out"], name="bias")]
    model = make_model(nodes, [("input", (None, 6))], [("out", (None, 3))], {"w": _r(6, 3), "b": _r(1, 3)})
    log = []
    out = gp.matmul_add_to_gemm(model, log)
    assert _ops(out) == ["Gemm"] and log == ["MatMul mm + Add bias -> Gemm mm"]
    _same_outputs(model, out, _r(4, 6))

    seq = make_model(nodes, [("input", (None, 5, 6))], [("out", (None, 5, 3))], {"w": _r(6, 3), "b": _r(3)})
    assert _ops(gp.matmul_add_to_gemm(seq)) == ["MatMul", "Add"]


def test_canonicalize_fuse_affine_is_off_by_default_and_reported_when_on():
    w = weights()
    b = twin_b(w)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    plain, report = gp.canonicalize(b, return_report=True)
    assert "MatMul" in _ops(plain) and _ops(plain).count("Add") == 4 and not report.fused_affine
    fused, report = gp.canonicalize(b, fuse_affine=True, return_report=True)
    assert _ops(fused) == ["Conv", "Relu", "MaxPool", "Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm",
                           "Softmax"]
    lines = report.lines()
    assert "MatMul head/matmul + Add head/bias -> Gemm head/matmul" in lines
    assert "folded Mul block1/bn/mul into Conv block1/conv" in lines
    reference = _outputs(b, x.transpose(0, 2, 3, 1))[0]
    np.testing.assert_allclose(_outputs(fused, x)[0], reference, rtol=1e-5, atol=1e-6)
    # and the twin's layers carry the weights that BN folding gives the BatchNormalization export
    a = gp.canonicalize(twin_a(w), fuse_affine=True)
    assert _ops(a) == _ops(fused)[:-1]
    inits_a = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    inits_b = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    for na, nb in zip(a.graph.node, fused.graph.node):
        for ia, ib in zip(na.input[1:], nb.input[1:]):
            va, vb = inits_a[ia], inits_b[ib]
            vb = vb.T if na.op_type == "Gemm" and vb.shape != va.shape else vb
            np.testing.assert_allclose(vb.reshape(va.shape), va, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fuse", [False, True])
def test_fp16_weight_copy_casts_fold_to_constants(fuse):
    """Cast(fp16 initializer) nodes fold away, including a Cast feeding a node that shares its tensor's name."""
    model = to_fp16_weights(twin_a(weights()))
    assert any(n.name == "fc" for n in model.graph.node) and "fc" in [n.output[0] for n in model.graph.node]
    out, report = gp.canonicalize(model, fuse_affine=fuse, return_report=True)
    assert "Cast" not in _ops(out)
    assert "removed Cast fc/cast (constant)" in report.lines()
    _same_outputs(model, out, rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
