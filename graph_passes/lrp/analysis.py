"""What the LRP rules need to know about a canonical graph: linear layers and their affine tails, first and
last layers, residual Adds, gates, tensors known to be non-negative, and where relevance is provably 0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from .._graph import ancestors, attrs, consumers, initializers, producers, tensor_array, tensor_infos
from ..vjp import NON_DIFFERENTIABLE
from .rules import LRPRule

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONV_OPS = ("Conv", "ConvTranspose")

@dataclass
class LinearLayer:
    node: str
    op: str
    kind: str                      # conv | dense
    tails: list = field(default_factory=list)   # names of fused affine tail nodes (Add const / BatchNorm)
    out: str = ""                  # the tensor carrying the layer's full output (last tail's)


@dataclass
class LRPAnalysis:
    """What the rules need to know about a canonical graph, and what the report prints."""

    linear: dict = field(default_factory=dict)        # node name -> LinearLayer
    tail_of: dict = field(default_factory=dict)       # tail node name -> linear node name
    first: set = field(default_factory=set)           # linear layers nearest the input
    last: set = field(default_factory=set)            # linear layers nearest the output
    residual: set = field(default_factory=set)        # Add/Sum/Sub nodes of two activations
    gates: dict = field(default_factory=dict)         # Mul node -> index of the signal operand (or -1)
    nonneg: set = field(default_factory=set)          # tensors known >= 0
    nodes: dict = field(default_factory=dict)         # node name -> NodeProto
    activations: set = field(default_factory=set)     # tensors that depend on a graph input
    floor_zero: set = field(default_factory=set)      # Relu and Clip(0, .) nodes: output <= 0 iff input <= 0
    normalising_divs: set = field(default_factory=set)  # Div nodes whose divisor is computed from the numerator
    products: dict = field(default_factory=dict)      # MatMul/Mul of two activations (not a gate) -> the index of
                                                      # the operand holding attention probabilities (a Softmax
                                                      # seen through data movement), -1 when neither does


_NONNEG_PRESERVING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
                      "Squeeze", "Unsqueeze", "Transpose", "Concat", "Identity", "Dropout", "ReduceMean",
                      "ReduceMax", "Pad", "Split", "Slice", "Resize", "Gather", "Expand", "Tile", "DepthToSpace",
                      "SpaceToDepth"}

# Elementwise ops: a tensor computed from one activation through these alone is a pointwise function of it
# (its "root"), e.g. the (erf(x / sqrt 2) + 1) of an exported GELU or the tanh(softplus(x)) of Mish.
POINTWISE_OPS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Exp", "Log", "Erf",
                 "Softplus", "Softsign", "Mish", "Gelu", "Elu", "Selu", "Celu", "Abs", "Neg", "Sqrt", "Pow",
                 "Reciprocal", "Add", "Sub", "Mul", "Div", "Cast", "Identity"}


def _channel_vector(value: np.ndarray, kind: str, out_rank: int, channels: int) -> np.ndarray | None:
    """A constant that broadcasts along the output channels only -> (channels,); else None."""
    v = np.asarray(value)
    if v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    if v.size != channels:
        return None
    axis_from_end = 1 if kind == "dense" else out_rank - 1  # channel axis counted from the end
    if v.ndim < axis_from_end or v.shape[v.ndim - axis_from_end] != channels:
        return None
    return v.reshape(-1).astype(np.float64)


def analyze(model: onnx.ModelProto) -> LRPAnalysis:
    g = model.graph
    inits = initializers(g)
    infos = tensor_infos(model)
    cons, prod = consumers(g), producers(g)
    a = LRPAnalysis(nodes={n.name: n for n in g.node})
    outputs = {o.name for o in g.output}
    live = {vi.name for vi in g.input if vi.name not in inits}
    for node in g.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if any(i in live for i in node.input):
            live.update(o for o in node.output if o)
    a.activations = live

    def const(name):
        return tensor_array(inits[name]) if name in inits else None

    for node in g.node:
        op = node.op_type
        if op in LINEAR_OPS and node.input[0] in live and len(node.input) > 1 and node.input[1] in inits:
            if op == "Gemm" and attrs(node).get("transA", 0):
                continue
            if op == "MatMul" and const(node.input[1]).ndim != 2:
                continue
            kind = "conv" if op in CONV_OPS else "dense"
            layer = LinearLayer(node.name, op, kind, out=node.output[0])
            w = const(node.input[1])
            if op == "Conv":
                channels = w.shape[0]
            elif op == "ConvTranspose":  # weight (C_in, M / group, k...)
                channels = w.shape[1] * attrs(node).get("group", 1)
            else:
                channels = w.shape[0] if op == "Gemm" and attrs(node).get("transB", 0) else w.shape[1]
            out_info = infos.get(node.output[0])
            rank = len(out_info.shape) if out_info is not None and out_info.shape is not None else (
                4 if kind == "conv" else 2)
            # fuse affine tails: single consumer, constant params, broadcast along channels
            t = node.output[0]
            while t not in outputs and len(cons.get(t, [])) == 1:
                nxt = cons[t][0]
                if nxt.op_type == "Add" and len(nxt.input) == 2:
                    other = nxt.input[1] if nxt.input[0] == t else nxt.input[0]
                    c = const(other)
                    if c is None or _channel_vector(c, kind, rank, channels) is None:
                        break
                elif nxt.op_type == "BatchNormalization" and nxt.input[0] == t:
                    if any(const(x) is None for x in nxt.input[1:5]) or len([o for o in nxt.output if o]) != 1:
                        break
                else:
                    break
                layer.tails.append(nxt.name)
                a.tail_of[nxt.name] = node.name
                t = nxt.output[0]
            layer.out = t
            a.linear[node.name] = layer
    # first / last linear layers
    after_linear: set = set()
    for node in g.node:
        if node.name in a.linear:
            if not any(i in after_linear for i in node.input):
                a.first.add(node.name)
            after_linear.update(o for o in node.output if o)
        elif any(i in after_linear for i in node.input):
            after_linear.update(o for o in node.output if o)
    before_linear: set = set()
    for node in reversed(list(g.node)):
        if node.name in a.linear:
            layer = a.linear[node.name]
            if layer.out not in before_linear:
                a.last.add(node.name)
            before_linear.update(i for i in node.input if i)
        elif any(o in before_linear for o in node.output):
            before_linear.update(i for i in node.input if i)
    # residual adds, gates, non-negative tensors
    for node in g.node:
        op = node.op_type
        if op in ("Add", "Sum", "Sub") and node.name not in a.tail_of:
            if sum(1 for i in node.input if i in live) >= 2:
                a.residual.add(node.name)
        if op == "Mul" and len(node.input) == 2:
            srcs = [prod.get(i) for i in node.input]
            live_in = [i in live for i in node.input]
            if not all(live_in):
                a.gates[node.name] = live_in.index(True) if any(live_in) else -1
            else:
                gate = [_sigmoid_like(i, prod, inits) for i in node.input]
                if gate[0] != gate[1]:
                    a.gates[node.name] = 1 if gate[0] else 0
                else:
                    signal = _pointwise_signal(node, prod, live, inits)
                    if signal is not None:
                        a.gates[node.name] = signal
        # a two-operand Einsum is bilinear like MatMul (MaxViT's relative attention writes Q K^T this way)
        if op in ("MatMul", "Mul", "Einsum") and len(node.input) == 2 and all(i in live for i in node.input) \
                and node.name not in a.gates:
            probs = [_softmax_behind(i, prod) for i in node.input]
            a.products[node.name] = probs.index(True) if probs.count(True) == 1 else -1
        if op == "Div" and len(node.input) == 2 and all(i in live for i in node.input):
            if node.input[0] in ancestors(g, [node.input[1]]):
                a.normalising_divs.add(node.name)
        if op == "Relu" or op == "Sigmoid" or op == "HardSigmoid" or op == "Softmax":
            a.nonneg.add(node.output[0])
            if op == "Relu":
                a.floor_zero.add(node.name)
        elif op == "Clip" and len(node.input) > 1 and node.input[1]:
            lo = const(node.input[1])
            if lo is not None and float(lo) >= 0:
                a.nonneg.add(node.output[0])
                if float(lo) == 0:
                    a.floor_zero.add(node.name)
        elif op in ("Add", "Sum") and all(i in a.nonneg for i in node.input):
            a.nonneg.add(node.output[0])
        elif op in _NONNEG_PRESERVING and all(i in a.nonneg for i in node.input[:1] if i) and (
                op != "Concat" or all(i in a.nonneg for i in node.input)):
            if op == "Pad":
                mode = attrs(node).get("mode", b"constant")
                cval = const(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
                if mode not in (b"constant", "constant") or cval is None or float(np.ravel(cval)[0]) < 0:
                    continue
            a.nonneg.update(o for o in node.output if o)
    return a


def _sigmoid_like(t: str, prod: dict, inits) -> bool:
    """Whether t is a sigmoid gate: Sigmoid, HardSigmoid, or hard sigmoid as Keras exports it
    (Clip(x + 3, 0, 6) / 6: Add, Clip, then Mul or Div by a constant), so a squeeze-excitation gate is held
    fixed whichever framework exported it."""
    node = prod.get(t)
    if node is None:
        return False
    if node.op_type in ("Sigmoid", "HardSigmoid"):
        return True
    if node.op_type in ("Mul", "Div") and len(node.input) == 2:
        scaled = _scaled_source(t, prod, inits)
        clip = prod.get(scaled) if scaled != t else None
        if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3 and all(
                i in inits for i in clip.input[1:]):
            return True
    return False


def _pointwise_of(t: str, x: str, prod: dict, live: set, depth: int = 24) -> bool:
    """Whether tensor t is computed from x through elementwise ops alone (constants aside), e.g. the
    erf(x / sqrt 2) + 1 of an exported GELU, or x itself."""
    if t == x:
        return True
    node = prod.get(t)
    if node is None or node.op_type not in POINTWISE_OPS or depth == 0:
        return False
    ins = [i for i in node.input if i in live]
    return bool(ins) and all(_pointwise_of(i, x, prod, live, depth - 1) for i in ins)


def _scaled_source(t: str, prod: dict, inits) -> str:
    """x for t = x * c or x / c with a constant c (the 0.5 x of some GELU exports); else t."""
    node = prod.get(t)
    if node is not None and node.op_type in ("Mul", "Div") and len(node.input) == 2:
        first, second = node.input
        if second in inits:
            return first
        if node.op_type == "Mul" and first in inits:
            return second
    return t


def _pointwise_signal(node: onnx.NodeProto, prod: dict, live: set, inits) -> int | None:
    """For a Mul of two activations where one is a pointwise function of the other, such as x * (erf(x/sqrt 2)
    + 1) (an exported GELU) or x * tanh(softplus(x)) (Mish): the index of that other operand, the signal (the
    first is the gate). None for products of two independent activations."""
    a, c = node.input
    if a == c:
        return None
    for signal, (s, gate) in enumerate(((a, c), (c, a))):
        source = _scaled_source(s, prod, inits)
        if _pointwise_of(gate, s, prod, live) or (source != s and _pointwise_of(gate, source, prod, live)):
            return signal
    return None


_MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Cast", "Flatten", "Expand"}


def _softmax_behind(t: str, prod: dict, depth: int = 8) -> bool:
    """`t` is a Softmax output seen through data movement (the attention probabilities of a block)."""
    for _ in range(depth):
        node = prod.get(t)
        if node is None:
            return False
        if node.op_type == "Softmax":
            return True
        if node.op_type not in _MOVES:
            return False
        t = node.input[0]
    return False


def positive_support(rules: Mapping[str, LRPRule], analysis: LRPAnalysis, start: str | None) -> set:
    """Tensors t whose relevance is provably 0 wherever t <= 0, given the rules (a backward sweep).

    It holds when every consumer hands t relevance of the form t (.) g with t >= 0 (linear rules on x / x+,
    Norm), or x+ (.) g, or routes the relevance of an output that holds it element for element (Relu and
    Clip(0, .) pass, MaxPool winner-take-all, shape ops). There the signed stabiliser y + eps*sign0(y) of a
    Norm or epsilon rule may be replaced by relu(y) + eps: equal where y > 0, and where y <= 0 the numerator
    is exactly 0 either way. That drops the Less/Where pair, which onnxruntime runs slowly, from every residual
    Add of a ResNet. The seeded tensor `start` never qualifies."""
    nodes = list(analysis.nodes.values())
    cons: dict = {}
    for n in nodes:
        for i in n.input:
            if i:
                cons.setdefault(i, []).append(n)
    routes = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Concat",
              "MaxPool"}
    support: set = set()

    def gives_supported(c, t: str) -> bool:
        rule = rules.get(c.name)
        if rule is None:  # off the relevance path: contributes nothing
            return True
        nonneg = t in analysis.nonneg
        if rule.kind == "linear":
            if c.input[0] != t:
                return True
            return all(term.input == "x+" or (nonneg and term.input in ("x", "x-"))
                       for group in rule.groups for term in group.terms)
        if rule.kind == "norm":
            return nonneg
        if rule.kind == "pass" and c.name in analysis.floor_zero:
            return c.output[0] in support
        if rule.kind == "gradient" and c.op_type in routes:
            return (c.op_type == "Concat" or c.input[0] == t) and c.output[0] in support
        return False

    for n in reversed(nodes):
        for o in n.output:
            if o and o != start and all(gives_supported(c, o) for c in cons.get(o, [])):
                support.add(o)
    return support


