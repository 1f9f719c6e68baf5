"""Model-parameter randomisation for sanity checks (Adebayo et al. 2018): swap a layer's weights for random
values of the same shape and scale, leaving the graph itself untouched.

A *layer* is a node that carries learned float initializers: Conv, ConvTranspose, Gemm, MatMul or
BatchNormalization (only its scale and shift; the running statistics stay, so variances stay positive).
An Add that adds an initializer to a MatMul/Gemm/Conv output (the bias of a MatMul + Add head) belongs to
that layer. "From the top" means from the output end: reverse topological order, the order Adebayo et al.
randomise in.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ._graph import GraphPassError, checked, clone, consumers, initializers, tensor_array, unique_node_names

PARAMETER_OPS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
                 "BatchNormalization": (1, 2)}
CASCADE = "cascade-from-top"
_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def _learned_inputs(node: onnx.NodeProto, inits: dict) -> list[str]:
    slots = PARAMETER_OPS.get(node.op_type, ())
    return [node.input[i] for i in slots
            if i < len(node.input) and node.input[i] in inits and inits[node.input[i]].data_type in _FLOAT]


def _bias_adds(graph: onnx.GraphProto, node: onnx.NodeProto, inits: dict) -> list[onnx.NodeProto]:
    users = consumers(graph).get(node.output[0], [])
    return [u for u in users if u.op_type == "Add" and len(users) == 1
            and any(i in inits and inits[i].data_type in _FLOAT for i in u.input)]


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Layers are addressed by node name; unnamed nodes get the names canonicalize would give them."""
    if all(n.name for n in model.graph.node):
        return model
    model = clone(model)
    unique_node_names(model)
    return model


def parameter_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes carrying learned weights, input side first (reverse it for "from the top")."""
    model = _named(model)
    inits = initializers(model.graph)
    return [n.name for n in model.graph.node if _learned_inputs(n, inits)]


def randomize_weights(model: onnx.ModelProto, layers, seed: int = 0, step: int | None = None) -> onnx.ModelProto:
    """A copy of `model` whose chosen layers have random weights; `model` itself is never edited.

    layers: a list of node names (see :func:`parameter_layers`), or ``"cascade-from-top"`` with `step` = how
    many layers to randomise counting from the output (``step=0`` returns an unchanged copy).
    Each weight tensor W becomes N(0, std(W)^2) noise of W's shape (all-zero tensors stay zero), drawn
    from one generator seeded by (seed, node name, tensor), so a layer gets the same values whichever
    other layers are randomised with it: cascading and independent runs share their random weights.
    Initializers shared with layers not chosen are duplicated rather than overwritten.
    """
    available = parameter_layers(model)
    if isinstance(layers, str):
        if layers != CASCADE:
            raise GraphPassError(f"randomize_weights: layers must be a list of node names or {CASCADE!r}, "
                                 f"not {layers!r}")
        if step is None or not 0 <= int(step) <= len(available):
            raise GraphPassError(f"randomize_weights: {CASCADE} needs step in 0..{len(available)}, got {step!r}")
        chosen = available[len(available) - int(step):] if int(step) else []
    else:
        chosen = list(layers)
        unknown = [n for n in chosen if n not in available]
        if unknown:
            raise GraphPassError(f"randomize_weights: node {unknown[0]!r} is not a layer with learned weights "
                                 f"(layers: {', '.join(available[-5:])}{' ...' if len(available) > 5 else ''})")
    out = _named(model)
    out = clone(out) if out is model else out
    g = out.graph
    inits = initializers(g)
    by_name = {n.name: n for n in g.node}
    for name in chosen:
        node = by_name[name]
        targets = [(node, i) for i in _learned_inputs(node, inits)]
        targets += [(add, i) for add in _bias_adds(g, node, inits) for i in add.input if i in inits]
        for owner, tensor in targets:
            value = tensor_array(inits[tensor])
            rng = np.random.default_rng([seed, _stable_hash(name), _stable_hash(tensor)])
            noise = (rng.standard_normal(value.shape) * float(np.std(value.astype(np.float64)))).astype(value.dtype)
            new_name = f"{tensor}__randomized__{name}"
            g.initializer.append(numpy_helper.from_array(noise, new_name))
            for k, inp in enumerate(owner.input):
                if inp == tensor:
                    owner.input[k] = new_name
    _drop_unused_initializers(g)
    return checked(out, "randomize_weights")


def _stable_hash(text: str) -> int:
    """Python's hash() is salted per process; seeds must not be."""
    h = 2166136261
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dropped = {t.name for t in graph.initializer if t.name not in used}
    if dropped:
        keep = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inputs = [vi for vi in graph.input if vi.name not in dropped]  # IR < 4 lists initializers as inputs
        del graph.input[:]
        graph.input.extend(inputs)
