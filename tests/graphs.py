"""Tiny ONNX graphs built with onnx.helper for tests (no shared files, no torch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET, IR = 17, 8


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET):
    """inputs/outputs: (name, shape) pairs of float32 tensors (None dims become symbolic)."""
    def vi(name, shape):
        dims = None if shape is None else [d if d is not None else f"{name}_d{i}" for i, d in enumerate(shape)]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()]
    graph = helper.make_graph(nodes, "test", [vi(*i) for i in inputs], [vi(*o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR)
    model = onnx.shape_inference.infer_shapes(model)
    inferred = {v.name: v for v in model.graph.value_info}
    for out in model.graph.output:  # outputs declared without a shape take the inferred one
        if not out.type.tensor_type.HasField("shape") and out.name in inferred:
            out.type.CopyFrom(inferred[out.name].type)
    onnx.checker.check_model(model)
    return model


def session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model, feeds, outputs=None):
    return session(model).run(outputs, feeds)


def to_float64(model):
    """The same graph in double precision, for onnx.reference (onnxruntime has no float64 Conv)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    return m


def _float64_ops():
    """onnx's reference Erf rounds to float32 (np.vectorize(erf, otypes=["f"])), which turns a float64 finite
    difference of GELU into noise of 1e-3; these keep the input's precision (Gelu too: its function body
    would run the float32 Erf)."""
    import math

    from onnx.reference.op_run import OpRun
    from onnx.reference.ops._op import OpRunUnaryNum

    erf = np.vectorize(math.erf, otypes=[np.float64])

    class Erf(OpRunUnaryNum):
        def _run(self, x):
            return (erf(x).astype(x.dtype),)

    class Gelu(OpRun):
        op_domain = ""

        def _run(self, x, approximate="none"):
            if approximate == "tanh":
                y = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
            else:
                y = 0.5 * x * (1 + erf(x / np.sqrt(2)))
            return (y.astype(x.dtype),)

    class LRN(OpRun):
        """The spec's formula (onnx's reference LRN differs from it and from onnxruntime)."""

        op_domain = ""

        def _run(self, x, alpha=1e-4, beta=0.75, bias=1.0, size=None):
            sq, lo, hi = x * x, (size - 1) // 2, size - 1 - (size - 1) // 2
            total = np.zeros_like(x)
            for c in range(x.shape[1]):
                total[:, c] = sq[:, max(0, c - lo):min(x.shape[1] - 1, c + hi) + 1].sum(1)
            return ((x / (bias + alpha / size * total) ** beta).astype(x.dtype),)

    class GroupNormalization(OpRun):
        """Its function body casts to stash_type (float32) for the statistics."""

        op_domain = ""

        def _run(self, x, scale, bias, epsilon=1e-5, num_groups=None, stash_type=1):
            g = x.reshape(x.shape[0], num_groups, -1)
            xhat = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + epsilon)).reshape(x.shape)
            shape = (1, -1) + (1,) * (x.ndim - 2)
            return ((xhat * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype),)

    return [Erf, Gelu, LRN, GroupNormalization]


class Float64Reference:
    """Runs a float32 test graph in float64 with onnx's numpy reference evaluator."""

    def __init__(self, model):
        from onnx.reference import ReferenceEvaluator

        self.ref = ReferenceEvaluator(to_float64(model), new_ops=_float64_ops())

    def run(self, outputs, feeds):
        feeds = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
        return self.ref.run(outputs, feeds)


def tiny_classifier(path, classes=4, size=16, extra_node=None):
    """conv -> relu -> maxpool -> conv -> relu -> GAP -> flatten -> gemm, saved to `path` with metadata."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="pool"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="fc"),
    ]
    if extra_node is not None:
        nodes.insert(2, extra_node)
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
             "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
             "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
             "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
             "fc": rng.standard_normal((classes, 8)).astype(np.float32)}
    model = make_model(nodes, [("input", (None, 3, size, size))], [("logits", (None, classes))], inits)
    for key, value in {"onnx_saliency.preset": "tf", "onnx_saliency.resize": str(size),
                       "onnx_saliency.crop": str(size)}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(path))
    return path


def conv3x3(x, w, b=None):
    """Numpy reference: 3x3 convolution, stride 1, zero padding 1, in float64."""
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,kc->nkhw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out if b is None else out + b[None, :, None, None]
