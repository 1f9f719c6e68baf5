"""Small helpers shared by the passes: copying, checking, shapes and graph topology on plain onnx protos."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

# The backward rules emit ScatterElements(reduction="add"), Split with a `split` input and ReduceSum with
# an `axes` input, which need opset >= 16/13; older exports are upgraded once, in canonicalize.
MIN_OPSET = 17
# onnxruntime 1.31 loads IR <= 13; onnx.helper would otherwise stamp IR 14 on anything it builds.
MIN_IR = 8


class GraphPassError(ValueError):
    """A pass was asked for something the graph cannot give (unknown tensor, unsupported op...)."""


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


# Initializers above this many elements are checked by type and shape only (see skeleton()).
_SKELETON_MIN_ELEMENTS = 1 << 14


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every large initializer turned into a typed graph input.

    The checker and shape inference serialise the whole model; on VGG-16 that is 500 MB per call and made
    loading take a minute. Neither needs the weight values (only small ones, e.g. Reshape targets, feed
    data propagation), so they run on this weight-free copy with the same structure, types and shapes.
    """
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g, src = sk.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    listed = {vi.name for vi in src.input}
    for t in src.initializer:
        if int(np.prod(t.dims)) >= _SKELETON_MIN_ELEMENTS and t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return sk


def checked(model: onnx.ModelProto, pass_name: str) -> onnx.ModelProto:
    """Every pass ends here: its output must satisfy the ONNX checker before anyone runs it."""
    try:
        onnx.checker.check_model(skeleton(model))
    except Exception as err:  # checker raises several types; the pass name is what the user needs
        raise GraphPassError(f"{pass_name}: produced an invalid model: {str(err).splitlines()[0]}") from err
    return model


# Ops whose first output has the first input's type and shape, for the ones onnx infers nothing for
# (GroupNormalization-21, a function op, in onnx 1.23): without it every shape after one is lost.
_SAME_SHAPE_OPS = {"GroupNormalization", "LayerNormalization", "InstanceNormalization", "LRN", "Gelu", "Mish",
                   "Erf", "Softplus", "BatchNormalization"}


def _same_shape_hints(model: onnx.ModelProto, inferred: onnx.ModelProto) -> list:
    known = {vi.name: vi for vi in list(inferred.graph.input) + list(inferred.graph.value_info)
             + list(inferred.graph.output) if vi.type.tensor_type.HasField("shape")}
    hints = []
    for node in model.graph.node:
        if (node.op_type in _SAME_SHAPE_OPS and node.output and node.output[0] not in known
                and node.input[0] in known):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known[node.input[0]])
            vi.name = node.output[0]
            hints.append(vi)
    return hints


def _known_dims(vi: onnx.ValueInfoProto) -> int:
    tt = vi.type.tensor_type
    return -1 if not tt.HasField("shape") else sum(d.HasField("dim_value") for d in tt.shape.dim)


def _most_specific(value_info) -> list:
    """One entry per tensor: shape inference appends its own entry beside a given hint instead of merging the
    two, and readers take the first; keep the one that knows the most dims."""
    best: dict = {}
    for vi in value_info:
        if vi.name not in best or _known_dims(vi) > _known_dims(best[vi.name]):
            best[vi.name] = vi
    return list(best.values())


def infer(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """A copy of `model` with shapes inferred for every tensor (computed on the weight-free skeleton);
    inplace: annotate `model` itself (for a pass's own intermediate copy: saves a copy of the weights)."""
    sk = skeleton(model)
    inferred = shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    for _ in range(8):  # each round lets the shapes after one more such op through
        hints = _same_shape_hints(model, inferred)
        if not hints:
            break
        del sk.graph.value_info[:]
        sk.graph.value_info.extend(list(inferred.graph.value_info) + hints)
        inferred = shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    out = model if inplace else clone(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(_most_specific(inferred.graph.value_info))
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def const_value(graph: onnx.GraphProto, name: str, inits=None) -> np.ndarray | None:
    """The numpy value of an initializer (or a Constant node output), else None."""
    inits = inits if inits is not None else initializers(graph)
    if name in inits:
        return numpy_helper.to_array(inits[name])
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    elem_type: int
    shape: tuple  # ints for static dims, None for symbolic/unknown ones; () for scalars; None if rank unknown

    @property
    def is_float(self) -> bool:
        return self.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                  onnx.TensorProto.BFLOAT16)


def _shape_of(vtype) -> tuple | None:
    tt = vtype.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Type and shape of every tensor in an already shape-inferred model."""
    g = model.graph
    out: dict[str, TensorInfo] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        out[vi.name] = TensorInfo(vi.name, vi.type.tensor_type.elem_type, _shape_of(vi.type))
    for t in g.initializer:
        out[t.name] = TensorInfo(t.name, t.data_type, tuple(t.dims))
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = TensorInfo(node.output[0], attr.t.data_type, tuple(attr.t.dims))
    return out


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: IR < 4 exports also list every initializer as an input."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def summarize_nodes(nodes, names_per_op: int = 3) -> str:
    """(name, op type) pairs as one short line, grouped by op type in graph order: "Slice (274: a, b, c and 271
    more); Gather (2: d, e)". Error messages list thousands of nodes on some exports; this stays readable."""
    groups: dict[str, list[str]] = {}
    for name, op in nodes:
        groups.setdefault(op, []).append(name)
    parts = []
    for op, names in groups.items():
        shown = ", ".join(names[:names_per_op])
        more = f" and {len(names) - names_per_op} more" if len(names) > names_per_op else ""
        parts.append(f"{op} ({len(names)}: {shown}{more})")
    return "; ".join(parts)


def unique_node_names(model: onnx.ModelProto) -> None:
    """Reports and rules are keyed by node name, so every node gets one (in place, on a private copy)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def ancestors(graph: onnx.GraphProto, tensors) -> set[str]:
    """Names of all tensors that the given tensors depend on (inclusive)."""
    prod = producers(graph)
    seen, stack = set(), list(tensors)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = prod.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return seen


def _outer_names(node: onnx.NodeProto) -> list[str]:
    """Tensors a node reads: its inputs and whatever its subgraphs (If/Loop/Scan bodies) read from outside."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            local = {t.name for t in sub.initializer} | {vi.name for vi in sub.input}
            for n in sub.node:
                local.update(o for o in n.output if o)
            names += [t for n in sub.node for t in _outer_names(n) if t not in local]
    return names


def is_topological(graph: onnx.GraphProto) -> bool:
    """Does every node come after the producers of everything it reads (as ONNX requires)?"""
    produced = {t.name for t in graph.initializer} | {vi.name for vi in graph.input}
    made_by_nodes = {o for n in graph.node for o in n.output if o}
    for node in graph.node:
        if any(t in made_by_nodes and t not in produced for t in _outer_names(node)):
            return False
        produced.update(o for o in node.output if o)
    return True


def execution_order(graph: onnx.GraphProto, tensors) -> list[onnx.NodeProto]:
    """The nodes the given tensors depend on, in the order an evaluator computes them from the data flow alone:
    depth first from the given tensors, each node's operands in operand order, a node after its operands.

    The node listing is not used, so no pass that re-sorts a graph can change this order. For parallel branches
    it is the order in which the framework's code wrote the operands of their merge: torchvision's
    `out += identity` exports Add(main, shortcut), Keras' `Add()([shortcut, x])` the other way round, and
    both frameworks run (and hook) the branches in that order."""
    prod = {o: n for n in graph.node for o in n.output if o}
    order: list[onnx.NodeProto] = []
    done: set[int] = set()
    for root in tensors:
        node = prod.get(root)
        if node is None or id(node) in done:
            continue
        stack = [(node, iter(_outer_names(node)))]
        on_path = {id(node)}
        while stack:
            current, operands = stack[-1]
            for t in operands:
                child = prod.get(t)
                if child is not None and id(child) not in done and id(child) not in on_path:
                    stack.append((child, iter(_outer_names(child))))
                    on_path.add(id(child))
                    break
            else:
                stack.pop()
                on_path.discard(id(current))
                done.add(id(current))
                order.append(current)
    return order
