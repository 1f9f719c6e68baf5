"""Two exports of one network, built with onnx.helper from the same numpy weights.

`twin_a`: the usual PyTorch-style export (NCHW, Conv with bias, BatchNormalization, Gemm head).
`twin_b`: the same function as a TF-style export (NHWC input + Transpose, bias-less Conv + Add, BatchNorms
decomposed into Sub/Mul/Add and Mul/Add, Reshape + MatMul + Add head, Softmax output).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import make_model

SIZE, CLASSES, EPS = 16, 4, 1e-3
META = {"onnx_saliency.preset": "tf", "onnx_saliency.resize": str(SIZE), "onnx_saliency.crop": str(SIZE)}


def weights(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {"w1": r(8, 3, 3, 3, scale=0.3), "b1": r(8, scale=0.1),
            "g1": (1 + 0.2 * rng.random(8)).astype(np.float32), "be1": r(8, scale=0.1),
            "m1": r(8, scale=0.1), "v1": (0.5 + rng.random(8)).astype(np.float32),
            "w2": r(8, 8, 3, 3, scale=0.2), "b2": r(8, scale=0.1),
            "g2": (1 + 0.2 * rng.random(8)).astype(np.float32), "be2": r(8, scale=0.1),
            "m2": r(8, scale=0.1), "v2": (0.5 + rng.random(8)).astype(np.float32),
            "fc": r(CLASSES, 8), "fcb": r(CLASSES, scale=0.1)}


def _with_meta(model):
    for key, value in META.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return model


def twin_a(w: dict) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], epsilon=EPS, name="bn1"),
        helper.make_node("Relu", ["n1"], ["a1"], name="relu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["n2"], epsilon=EPS, name="bn2"),
        helper.make_node("Relu", ["n2"], ["a2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    inits = {k: w[k] for k in ("w1", "b1", "g1", "be1", "m1", "v1", "w2", "b2", "g2", "be2", "m2", "v2", "fc", "fcb")}
    return _with_meta(make_model(nodes, [("input", (None, 3, SIZE, SIZE))], [("logits", (None, CLASSES))], inits))


def twin_b(w: dict, pool: str = "GlobalAveragePool") -> onnx.ModelProto:
    """pool="ReduceMean": the same average spelled differently, so only activations can pair it with A's."""
    s1 = (w["g1"] / np.sqrt(w["v1"] + EPS)).astype(np.float32)
    s2 = (w["g2"] / np.sqrt(w["v2"] + EPS)).astype(np.float32)
    col = (1, 8, 1, 1)
    inits = {"k1": w["w1"], "bias1": w["b1"].reshape(col), "mean1": w["m1"].reshape(8, 1, 1),
             "scale1": s1.reshape(col), "beta1": w["be1"].reshape(8, 1, 1),
             "k2": w["w2"], "bias2": w["b2"],
             "scale2": s2.reshape(col), "shift2": (w["be2"] - w["m2"] * s2).astype(np.float32).reshape(col),
             "dense": np.ascontiguousarray(w["fc"].T), "dense_b": w["fcb"].reshape(1, CLASSES),
             "flat_shape": np.array([0, -1], np.int64)}
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "k1"], ["x1"], pads=[1, 1, 1, 1], name="block1/conv"),
        helper.make_node("Add", ["x1", "bias1"], ["x1b"], name="block1/bias"),
        helper.make_node("Sub", ["x1b", "mean1"], ["x1c"], name="block1/bn/sub"),
        helper.make_node("Mul", ["x1c", "scale1"], ["x1s"], name="block1/bn/mul"),
        helper.make_node("Add", ["x1s", "beta1"], ["x1n"], name="block1/bn/add"),
        helper.make_node("Relu", ["x1n"], ["y1"], name="block1/relu"),
        helper.make_node("MaxPool", ["y1"], ["q1"], kernel_shape=[2, 2], strides=[2, 2], name="block1/pool"),
        helper.make_node("Conv", ["q1", "k2", "bias2"], ["x2"], pads=[1, 1, 1, 1], name="block2/conv"),
        helper.make_node("Mul", ["scale2", "x2"], ["x2s"], name="block2/bn/mul"),
        helper.make_node("Add", ["x2s", "shift2"], ["x2n"], name="block2/bn/add"),
        helper.make_node("Relu", ["x2n"], ["y2"], name="block2/relu"),
        helper.make_node("GlobalAveragePool", ["y2"], ["pooled"], name="head/gap") if pool == "GlobalAveragePool"
        else helper.make_node("ReduceMean", ["y2"], ["pooled"], axes=[2, 3], keepdims=1, name="head/mean"),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="head/reshape"),
        helper.make_node("MatMul", ["flat", "dense"], ["mm"], name="head/matmul"),
        helper.make_node("Add", ["mm", "dense_b"], ["scores"], name="head/bias"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=1, name="head/softmax"),
    ]
    return _with_meta(make_model(nodes, [("image", (None, SIZE, SIZE, 3))], [("probs", (None, CLASSES))], inits))


def to_fp16_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deployment-style fp16 copy: float initializers stored as float16, each followed by a Cast to float."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    casts, keep = [], []
    for t in g.initializer:
        if t.data_type != TensorProto.FLOAT:
            keep.append(t)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "/fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [t.name], to=TensorProto.FLOAT, name=t.name + "/cast"))
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def save(model: onnx.ModelProto, path):
    onnx.save(model, str(path))
    return path
