"""float16 / bfloat16 models, and mixed-precision ones, computed in float32.

Deployment exports store weights, activations or both in half precision (torch's .half(), onnxconverter's
float16 conversion with or without float32 inputs kept). The backward and relevance rules, onnxruntime's CPU
kernels for many ops, and the maps users compare all want float32: every half-precision initializer, Constant,
Cast target, tensor attribute and declared input/output/value type becomes float32. The arithmetic is then the
float32 model's on the half-precision weights (rounded once, when the file was written), so maps agree with the
float32 original within what rounding the weights to float16 changes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ._graph import tensor_array

HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_NAMES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def _widen(t: onnx.TensorProto) -> onnx.TensorProto:
    wide = numpy_helper.from_array(tensor_array(t).astype(np.float32), t.name)
    wide.doc_string = t.doc_string
    return wide


def to_float32(model: onnx.ModelProto) -> list[str]:
    """Convert `model` (in place: canonicalize's private copy) to float32; returns report lines (none when the
    model had no half-precision part)."""
    g = model.graph
    kinds: set = set()
    counts = {"initializer": 0, "Cast": 0, "constant": 0}
    for i, t in enumerate(g.initializer):
        if t.data_type in HALF:
            kinds.add(t.data_type)
            g.initializer[i].CopyFrom(_widen(t))
            counts["initializer"] += 1
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF:
                kinds.add(attr.t.data_type)
                attr.t.CopyFrom(_widen(attr.t))
                counts["constant"] += 1
            elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i in HALF:
                kinds.add(attr.i)
                attr.i = onnx.TensorProto.FLOAT
                counts["Cast" if node.op_type == "Cast" else "constant"] += 1
    io = []
    for where, values in (("input", g.input), ("output", g.output), ("", g.value_info)):
        for vi in values:
            tt = vi.type.tensor_type
            if tt.elem_type in HALF:
                kinds.add(tt.elem_type)
                tt.elem_type = onnx.TensorProto.FLOAT
                if where:
                    io.append(f"{where} {vi.name}")
    if not kinds:
        return []
    precision = "/".join(sorted(_NAMES[k] for k in kinds))
    parts = [f"{n} {what}(s)" for what, n in counts.items() if n] + io
    return [f"{precision} computed in float32: converted {', '.join(parts)}; feed float32 images"]
