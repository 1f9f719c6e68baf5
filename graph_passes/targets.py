"""append_target_seed: compute the one-hot seed of the class to explain inside the graph.

A `targets` int64 input (one per image; -1 = the top-1 class) becomes `seed` = one_hot(target) shaped like the
scores, plus outputs with the resolved class and its score. Doing it in-graph means one onnxruntime call gives
logits, activations and gradients even when the target is "whatever the model predicts", and an exported
explain graph takes targets as a plain input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._graph import GraphPassError, checked, clone, infer, tensor_infos

TARGETS_INPUT = "targets"
SEED = "target_seed"
RESOLVED = "target_class"
TARGET_SCORE = "target_score"


def append_target_seed(model: onnx.ModelProto, scores: str) -> onnx.ModelProto:
    m = clone(model)
    if not m.graph.value_info:
        m = infer(m)
    info = tensor_infos(m).get(scores)
    if info is None or info.shape is None or len(info.shape) != 2 or info.shape[1] is None:
        raise GraphPassError(f"append_target_seed: scores tensor {scores!r} must be (N, classes) with static classes")
    classes = info.shape[1]

    def c(name, value, dtype):
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    nodes = [
        helper.make_node("ArgMax", [scores], ["ts/argmax"], axis=1, keepdims=0, name="ts/argmax"),
        helper.make_node("Less", [TARGETS_INPUT, c("ts/zero", 0, np.int64)], ["ts/auto"], name="ts/less"),
        helper.make_node("Where", ["ts/auto", "ts/argmax", TARGETS_INPUT], [RESOLVED], name="ts/where"),
        helper.make_node("OneHot", [RESOLVED, c("ts/depth", [classes], np.int64), c("ts/values", [0.0, 1.0], np.float32)],
                         [SEED], axis=-1, name="ts/onehot"),
        helper.make_node("Unsqueeze", [RESOLVED, c("ts/axis1", [1], np.int64)], ["ts/idx"], name="ts/unsqueeze"),
        helper.make_node("GatherElements", [scores, "ts/idx"], ["ts/score2d"], axis=1, name="ts/gather"),
        helper.make_node("Squeeze", ["ts/score2d", "ts/axis1"], [TARGET_SCORE], name="ts/squeeze"),
    ]
    m.graph.node.extend(nodes)
    m.graph.input.append(helper.make_tensor_value_info(TARGETS_INPUT, onnx.TensorProto.INT64, ["N"]))
    m.graph.output.append(helper.make_tensor_value_info(RESOLVED, onnx.TensorProto.INT64, ["N"]))
    m.graph.output.append(helper.make_tensor_value_info(TARGET_SCORE, onnx.TensorProto.FLOAT, ["N"]))
    m.graph.value_info.append(helper.make_tensor_value_info(SEED, onnx.TensorProto.FLOAT, ["N", classes]))
    return checked(m, "append_target_seed")
