"""Keras applications carry their preprocessing (Rescaling, Normalization) inside the model, before the NHWC ->
NCHW Transpose that tf2onnx emits; canonicalize moves it behind the absorbed Transpose with NCHW constants."""

import numpy as np
import onnx
import pytest
from onnx import helper

import graph_passes as gp
from onnx_saliency import Explainer
from onnx_saliency.errors import UnsupportedModelError
from tests.graphs import Float64Reference, make_model, session

H = W = 6


def _keras_like(mean_shape=(1, 1, 1, 3)):
    rng = np.random.default_rng(0)
    inits = {"scale": np.array(1 / 255, np.float32), "mean": rng.uniform(0.2, 0.6, mean_shape).astype(np.float32),
             "inv_std": rng.uniform(2, 4, (3,)).astype(np.float32),
             "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "fc": rng.standard_normal((4, 5)).astype(np.float32)}
    nodes = [helper.make_node("Mul", ["x", "scale"], ["scaled"], name="rescaling/mul"),
             helper.make_node("Sub", ["scaled", "mean"], ["centred"], name="normalization/sub"),
             helper.make_node("Mul", ["centred", "inv_std"], ["normed"], name="normalization/truediv"),
             helper.make_node("Transpose", ["normed"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["nchw", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="head")]
    return make_model(nodes, [("x", (None, H, W, 3))], [("y", (None, 5))], inits)


def test_preprocessing_before_the_layout_transpose_moves_behind_it(tmp_path):
    model = _keras_like()
    canonical, report = gp.canonicalize(model, return_report=True)
    dims = [d.dim_value or d.dim_param for d in canonical.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, H, W]
    assert report.absorbed_transpose == "to_nchw"
    assert any("normalization/sub" in n for n in report.notes)
    assert "Transpose" not in {n.op_type for n in canonical.graph.node}
    x = np.random.default_rng(1).uniform(0, 255, (2, H, W, 3)).astype(np.float32)
    expected = session(model).run(["y"], {"x": x})[0]
    got = session(canonical).run(["y"], {"x": x.transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # the input gradient, in the user's NHWC layout, against float64 central differences of the original
    path = tmp_path / "keras_like.onnx"
    onnx.save(model, path)
    ex = Explainer(path)
    assert ex.model.layout == "NHWC"
    result = ex.explain(x[:1], method="gradient", target=2)
    grad = result.attributions[0].transpose(1, 2, 0)  # the engine's NCHW back to NHWC
    ref, h = Float64Reference(model), 1e-3
    for idx in [(0, 0, 0), (2, 3, 1), (5, 5, 2), (3, 1, 0)]:
        xp, xm = x[:1].astype(np.float64), x[:1].astype(np.float64)
        xp[(0,) + idx] += h
        xm[(0,) + idx] -= h
        fd = (ref.run(["y"], {"x": xp})[0][0, 2] - ref.run(["y"], {"x": xm})[0][0, 2]) / (2 * h)
        assert grad[idx] == pytest.approx(fd, rel=1e-3, abs=1e-6)


def test_spatially_varying_preprocessing_is_not_moved(tmp_path):
    """A constant that varies over space is not per-channel preprocessing: the model stays refused, by name."""
    path = tmp_path / "spatial.onnx"
    onnx.save(_keras_like(mean_shape=(1, H, W, 1)), path)
    with pytest.raises(UnsupportedModelError, match="not followed by a single Transpose"):
        Explainer(path)
