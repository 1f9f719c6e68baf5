"""float16 and mixed-precision models are computed in float32 (graph_passes.precision), and explain like the
float32 model they were made from, within what rounding the weights to float16 changes.

Both deployment styles are built here from the float32 tiny classifier: everything in float16 (inputs, weights,
outputs: torch's .half()), and float16 inside with float32 inputs and outputs kept (Casts at the boundaries, as
onnxconverter's keep_io_types). torch .half() exports are checked in test_torch_exports.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_passes as gp
from onnx_saliency import Explainer
from tests.graphs import tiny_classifier


def to_float16(model: onnx.ModelProto, keep_io: bool) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    del g.value_info[:]
    if keep_io:  # float32 at the boundaries, float16 inside
        x, y = g.input[0].name, g.output[0].name
        for node in g.node:
            node.input[:] = [f"{x}/half" if i == x else i for i in node.input]
            node.output[:] = [f"{y}/half" if o == y else o for o in node.output]
        nodes = [helper.make_node("Cast", [x], [f"{x}/half"], to=TensorProto.FLOAT16, name="to_half"), *g.node,
                 helper.make_node("Cast", [f"{y}/half"], [y], to=TensorProto.FLOAT, name="to_float")]
        del g.node[:]
        g.node.extend(nodes)
    else:
        for vi in (g.input[0], g.output[0]):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16")
    path = tiny_classifier(d / "fp32.onnx", size=24)
    base = onnx.load(str(path))
    out = {"fp32": path}
    for name, keep in (("fp16", False), ("mixed", True)):
        out[name] = d / f"{name}.onnx"
        onnx.save(to_float16(base, keep), str(out[name]))
    return out


def test_the_report_says_what_was_converted(variants):
    for name, expect in (("fp16", "input input, output logits"), ("mixed", "1 Cast(s)")):
        _, report = gp.canonicalize(onnx.load(str(variants[name])), return_report=True)
        line = next(line for line in report.lines() if "computed in float32" in line)
        assert line.startswith("float16 computed in float32: converted 5 initializer(s)") and expect in line, line
    _, report = gp.canonicalize(onnx.load(str(variants["fp32"])), return_report=True)
    assert not any("float32" in line for line in report.lines())


@pytest.mark.parametrize("name", ["fp16", "mixed"])
@pytest.mark.parametrize("method", ["gradient", "gradcam", "lrp"])
def test_maps_match_the_float32_model(variants, name, method):
    x = np.random.default_rng(0).standard_normal((3, 3, 24, 24)).astype(np.float32)
    ref = Explainer(variants["fp32"], threads=1).explain(x, method=method, target=[0, 1, 2])
    got = Explainer(variants[name], threads=1).explain(x, method=method, target=[0, 1, 2])
    a, b = got.maps.reshape(3, -1).astype(np.float64), ref.maps.reshape(3, -1).astype(np.float64)
    for i in range(3):
        assert np.corrcoef(a[i], b[i])[0, 1] > 0.999
    # float16 weights carry ~3 significant digits: the maps move by about that much, not more
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
    assert np.abs(a - b).max() > 0  # the weights really were rounded


def test_float16_weights_computed_exactly_in_float32(variants):
    """Against the float32 model carrying the same rounded weights, the float16 model's gradient is the same
    float32 computation."""
    rounded = onnx.load(str(variants["fp32"]))
    for i, t in enumerate(rounded.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            v = numpy_helper.to_array(t).astype(np.float16).astype(np.float32)
            rounded.graph.initializer[i].CopyFrom(numpy_helper.from_array(v, t.name))
    path = variants["fp32"].parent / "rounded.onnx"
    onnx.save(rounded, str(path))
    x = np.random.default_rng(1).standard_normal((2, 3, 24, 24)).astype(np.float32)
    ref = Explainer(path, threads=1).explain(x, method="gradient", target=[0, 3]).attributions
    for name in ("fp16", "mixed"):
        got = Explainer(variants[name], threads=1).explain(x, method="gradient", target=[0, 3]).attributions
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
