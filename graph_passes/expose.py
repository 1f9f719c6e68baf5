"""expose_tensors: make intermediate activations graph outputs, keeping the original outputs first."""

from __future__ import annotations

import onnx
from onnx import helper

from ._graph import GraphPassError, checked, clone, infer, initializers, producers, tensor_infos


def expose_tensors(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = clone(model)
    if not m.graph.value_info:
        m = infer(m)
    infos = tensor_infos(m)
    prod, inits = producers(m.graph), initializers(m.graph)
    present = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for name in names:
        if name in inits:
            raise GraphPassError(f"expose_tensors: {name!r} is a weight, not an activation")
        if name not in prod and name not in present:
            raise GraphPassError(f"expose_tensors: no tensor named {name!r} in the graph")
        if name in {o.name for o in m.graph.output}:
            continue
        info = infos.get(name)
        elem = info.elem_type if info else onnx.TensorProto.FLOAT
        # check_model wants a shape on every output: symbolic dims get stable names
        shape = None if info is None or info.shape is None else [
            d if d is not None else f"{name}_dim{i}" for i, d in enumerate(info.shape)]
        m.graph.output.append(helper.make_tensor_value_info(name, elem, shape))
    return checked(m, "expose_tensors")
