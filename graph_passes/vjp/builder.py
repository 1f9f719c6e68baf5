"""append_vjp: add a reverse-mode subgraph computing d(seed . output)/d(tensor) for chosen tensors.

The forward graph stays untouched and keeps its outputs; the gradients come out of the same onnxruntime run
as extra outputs named ``grad_name(tensor)``. Each op's backward is a *rule* (see rules.py): a function that
emits ONNX nodes, so a method can swap in a modified backward (guided ReLU, TSGB, ...) per op type or per node.
Only nodes on a path from a requested tensor to the output get a backward, so a Grad-CAM at the last conv
costs a few tiny nodes, not a full backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .._graph import (GraphPassError, TensorInfo, attrs, checked, clone, infer, initializers, opset_of, producers,
                      store_of, summarize_nodes, tensor_array, tensor_infos)

# Ops whose outputs never carry gradient (shape arithmetic, comparisons, index outputs).
NON_DIFFERENTIABLE = {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual",
                      "LessOrEqual", "Not", "And", "Or", "Xor", "NonZero", "ConstantOfShape", "Range", "OneHot",
                      "Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}


# Constants at least this large go to the model's weight store (when it has one) instead of into the graph.
LARGE_CONSTANT = 1 << 14


def grad_name(tensor: str) -> str:
    return f"{tensor}__grad"


class UnsupportedOpsError(GraphPassError):
    def __init__(self, nodes: list[tuple[str, str]]):
        self.nodes = nodes
        super().__init__(f"no backward rule for {len(nodes)} node(s): {summarize_nodes(nodes)}")


class VJPBuilder:
    """Emission context handed to rules: add nodes and constants, ask for shapes and constant values."""

    def __init__(self, model: onnx.ModelProto, prefix: str):
        self.model = model
        self.graph = model.graph
        self.prefix = prefix
        self.infos: dict[str, TensorInfo] = tensor_infos(model)
        self.inits = initializers(model.graph)
        self.store = store_of(model)
        for node in model.graph.node:  # Constant nodes hold constants too (unfolded graphs, hand-built tests)
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if node.op_type == "Constant" and value is not None:
                self.inits.setdefault(node.output[0], value)
        self.opset = opset_of(model)
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self.node: onnx.NodeProto | None = None  # the forward node whose rule is running

    # --- naming and emission -------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        base = self.node.name if self.node is not None else "vjp"
        return f"{self.prefix}{base}/{hint}_{self._count}"

    def add(self, op: str, inputs: list[str], n_out: int = 1, **attributes) -> str | list[str]:
        outs = [self.fresh(op) for _ in range(n_out)]
        self.new_nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(op + "_node"), **attributes))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        if arr.size >= LARGE_CONSTANT and self.store is not None:
            # a derived weight (LRP's modified weights, transposes): kept once in the model's weight store
            name = f"{self.prefix}const_{len(self._consts)}"
            placeholder = self.store.shared(name, arr)
            key = ("store", placeholder.external_data[0].value)
            if key not in self._consts:
                self.new_inits.append(placeholder)
                self._consts[key] = name
            return self._consts[key]
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"{self.prefix}const_{len(self._consts)}"
            self.new_inits.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def value(self, name: str) -> np.ndarray | None:
        return tensor_array(self.inits[name]) if name in self.inits else None

    def shape(self, name: str) -> tuple | None:
        info = self.infos.get(name)
        return None if info is None else info.shape

    def static_shape(self, name: str, what: str) -> tuple:
        shape = self.shape(name)
        if shape is None:
            raise GraphPassError(f"{self.node.name} ({self.node.op_type}): {what} needs the shape of {name}, "
                                 "which shape inference could not determine")
        return shape

    # --- common building blocks --------------------------------------------------------------------------
    def unbroadcast(self, grad: str, like: str, out: str) -> str:
        """Sum `grad` (shaped like `out`) over the axes along which `like` was broadcast."""
        s_in, s_out = self.shape(like), self.shape(out)
        if s_in is None or s_out is None:
            raise GraphPassError(f"{self.node.name} ({self.node.op_type}): broadcasting needs known ranks")
        lead = len(s_out) - len(s_in)
        axes = list(range(lead))
        for i, d in enumerate(s_in):
            o = s_out[lead + i]
            if d == 1 and o != 1:
                axes.append(lead + i)
        if not axes:
            return grad
        summed = self.add("ReduceSum", [grad, self.const(axes, np.int64)], keepdims=1)
        return self.add("Reshape", [summed, self.add("Shape", [like])])

    def zeros_like(self, name: str) -> str:
        return self.add("ConstantOfShape", [self.add("Shape", [name])],
                        value=numpy_helper.from_array(np.zeros(1, np.float32)))


# A rule gets (builder, node, grads of the node's outputs: name or None) and returns, for each node input,
# the name of its gradient or None. `needs[i]` says which inputs want a gradient.
Rule = Callable[[VJPBuilder, onnx.NodeProto, list, list], list]
RuleMap = Mapping[str, Rule]


def append_vjp(model: onnx.ModelProto, output: str, wrt: list[str], *, seed: str | None = None,
               rules: RuleMap, node_rules: Mapping[str, Rule] | None = None,
               prefix: str = "vjp/") -> onnx.ModelProto:
    """Return a copy of `model` with outputs ``grad_name(t)`` = d(sum(seed * output))/dt for t in `wrt`.

    `seed` names an existing float tensor shaped like `output`; when None a graph input ``output + "__seed"``
    is added. `rules` maps op types to backward rules (graph_passes.vjp.append_vjp defaults to rules.PLAIN);
    `node_rules` overrides the rule for single nodes by name. Raises UnsupportedOpsError, listing every node
    without a rule, before anything is emitted.
    """
    rules = dict(rules)
    node_rules = dict(node_rules or {})
    m = clone(model)
    if not m.graph.value_info:
        m = infer(m)
    infos = tensor_infos(m)
    prod = producers(m.graph)
    for name in [output, *wrt]:
        if name not in infos and name not in prod:
            raise GraphPassError(f"append_vjp: no tensor named {name!r} in the graph")
    inits = initializers(m.graph)
    for name in wrt:
        if name in inits:
            raise GraphPassError(f"append_vjp: {name!r} is a weight, not an activation")

    path_nodes = _nodes_between(m.graph, wrt, output, infos)
    missing = [(n.name, n.op_type) for n in path_nodes
               if n.name not in node_rules and n.op_type not in rules]
    if missing:
        raise UnsupportedOpsError(missing)

    b = VJPBuilder(m, prefix)
    if seed is None:
        seed = output + "__seed"
        out_info = infos.get(output)
        shape = None if out_info is None or out_info.shape is None else [
            d if d is not None else f"seed_dim{i}" for i, d in enumerate(out_info.shape)]
        m.graph.input.append(helper.make_tensor_value_info(seed, onnx.TensorProto.FLOAT, shape))

    needs = _tensors_needing_grad(path_nodes, wrt)
    contribs: dict[str, list[str]] = {output: [seed]}

    def total(t: str) -> str | None:
        parts = contribs.get(t)
        if not parts:
            return None
        if len(parts) > 1:
            contribs[t] = [b.add("Sum", parts)]
        return contribs[t][0]

    for node in reversed(path_nodes):
        grads_out = [total(o) if o else None for o in node.output]
        if all(g is None for g in grads_out):
            continue
        want = [bool(i) and i in needs for i in node.input]
        b.node = node
        rule = node_rules.get(node.name) or rules[node.op_type]
        grads_in = rule(b, node, grads_out, want)
        b.node = None
        for i, (name, g) in enumerate(zip(node.input, grads_in)):
            if g is not None and want[i]:
                contribs.setdefault(name, []).append(g)

    for t in wrt:
        g = total(t)
        if g is None:  # t does not influence the output: its gradient is exactly zero
            g = b.zeros_like(t)
        b.new_nodes.append(helper.make_node("Identity", [g], [grad_name(t)], name=f"{prefix}out/{t}"))
        info = infos.get(t)
        shape = None if info is None or info.shape is None else [
            d if d is not None else f"{t}_dim{i}" for i, d in enumerate(info.shape)]
        m.graph.output.append(helper.make_tensor_value_info(grad_name(t), onnx.TensorProto.FLOAT, shape))

    # rules may have added outputs to forward nodes (MaxPool indices): those edits live on m's nodes already
    m.graph.node.extend(b.new_nodes)
    m.graph.initializer.extend(b.new_inits)
    return checked(m, "append_vjp")


def differentiable_path(model: onnx.ModelProto, wrt: list[str], output: str) -> list[onnx.NodeProto]:
    """The nodes append_vjp would give a backward rule: those on a float path from `wrt` to `output`. Nodes that
    do not depend on `wrt` (constants, shape arithmetic) never need one. `model` must carry inferred shapes."""
    return _nodes_between(model.graph, wrt, output, tensor_infos(model))


def _nodes_between(graph: onnx.GraphProto, wrt: list[str], output: str, infos) -> list[onnx.NodeProto]:
    """Nodes (in graph order, which ONNX requires to be topological) on a differentiable path wrt -> output."""
    prod = producers(graph)
    # backward reachability from the output
    to_output: set[int] = set()
    stack = [output]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = prod.get(t)
        if node is None or node.op_type in NON_DIFFERENTIABLE:
            continue
        to_output.add(id(node))
        stack.extend(i for i in node.input if i)
    # forward reachability from the wrt tensors, through float tensors only
    live = set(wrt)
    path = []
    for node in graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if any(i in live for i in node.input):
            floats = [o for o in node.output if o and (infos.get(o) is None or infos[o].is_float)]
            live.update(floats)
            if id(node) in to_output:
                path.append(node)
    return path


def _tensors_needing_grad(path_nodes, wrt) -> set[str]:
    needs = set(wrt)
    for node in path_nodes:
        if any(i in needs for i in node.input):
            needs.update(o for o in node.output if o)
    return needs
