"""Layer-wise relevance propagation as ONNX: rules as data, compiled into append_vjp backward rules.

Relevance flows backwards exactly like a gradient in append_vjp, only each node's "backward" is an LRP rule.
So one onnxruntime call yields logits, activations and relevance at any requested tensor, on any provider.

Rules are frozen dataclasses (after zennit's BasicHook): a linear rule is a list of *groups*, each group a list
of *terms* (input modifier, weight modifier, bias modifier, sign). For a linear layer y = W x + b:

    z_g   = sum_t sign_t * (W_t in_t + b_t)                        (per group g)
    s_g   = mask_g(y) * R / stab(z_g),   stab(z) = z + eps * sign0(z)   (sign0(0) = +1, as zennit)
    R_in  = sum_g coef_g * sum_t sign_t * in_t (.) W_t^T s_g

LRP-0/epsilon reuse the forward output y as z (no extra conv). Where the input is provably non-negative
(produced by Relu, a pool of one, ...), terms on x- vanish and x+ = x, which halves the work of z+/alpha-beta.

Layers: Conv (grouped/depthwise, dilated, asymmetric/auto pads), Gemm (transA=0) and MatMul with a constant
weight. An affine *tail* directly after a linear layer, i.e. a bias Add of a constant broadcast along the output
channels (tf2onnx's MatMul + BiasAdd) or a BatchNormalization that canonicalisation could not fold, is treated
as part of that layer: the rule sees W_eff = W * scale, b_eff = b * scale + shift, and the tail node passes
relevance through unchanged. Folded and unfolded BatchNorm therefore give the same relevance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ._graph import GraphPassError, attrs, consumers, initializers, producers, tensor_infos
from .vjp import NON_DIFFERENTIABLE, append_vjp

LINEAR_OPS = ("Conv", "Gemm", "MatMul")


# --- rules as data ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    input: str = "x"    # x | x+ | x- | ones | low | high
    weight: str = "w"   # w | w+ | w- | ones | w2 | w+g+ (w + gamma w+) | w+g- (w + gamma w-)
    bias: str = "b"     # b | b+ | b- | zero | b2 | b+g+ | b+g-
    sign: float = 1.0


@dataclass(frozen=True)
class Group:
    terms: tuple
    coef: float = 1.0
    mask: str = ""      # "" | "pos" | "neg": only outputs whose forward value is > 0 / < 0 receive relevance


@dataclass(frozen=True)
class LRPRule:
    """One propagation rule. kind: linear | pass | norm | gradient | gate | proportional (MaxPool)."""

    name: str
    kind: str = "linear"
    groups: tuple = ()
    eps: float = 1e-6
    gamma: float = 0.0
    low: tuple | None = None
    high: tuple | None = None

    def describe(self) -> str:
        extra = []
        if self.kind in ("linear", "norm", "proportional"):
            extra.append(f"eps={self.eps:g}")
        if self.gamma:
            extra.append(f"gamma={self.gamma:g}")
        return f"{self.name}({', '.join(extra)})" if extra else self.name

    @property
    def reuses_forward(self) -> bool:
        """z equals the layer's own forward output (LRP-0 / epsilon): no extra forward conv."""
        return (self.kind == "linear" and len(self.groups) == 1 and not self.groups[0].mask
                and self.groups[0].terms == (Term("x", "w", "b"),))


def Epsilon(eps: float = 1e-6) -> LRPRule:
    return LRPRule("epsilon" if eps else "lrp0", groups=(Group((Term("x", "w", "b"),)),), eps=eps)


def LRP0() -> LRPRule:
    return Epsilon(0.0)


def ZPlus(stabilizer: float = 1e-6) -> LRPRule:
    """zennit ZPlus: z = W+ x+ + b+ + W- x- (positive bias kept in the denominator, as zennit)."""
    return LRPRule("zplus", groups=(Group((Term("x+", "w+", "b+"), Term("x-", "w-", "zero"))),), eps=stabilizer)


def AlphaBeta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> LRPRule:
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
        raise ValueError(f"alpha-beta rule needs alpha, beta >= 0 and alpha - beta = 1 (got {alpha}, {beta})")
    groups = [Group((Term("x+", "w+", "b+"), Term("x-", "w-", "zero")), coef=alpha)]
    if beta:
        groups.append(Group((Term("x+", "w-", "b-"), Term("x-", "w+", "zero")), coef=-beta))
    name = "zplus" if beta == 0 and alpha == 1 else f"alpha{alpha:g}beta{beta:g}"
    return LRPRule(name, groups=tuple(groups), eps=stabilizer)


def Gamma(gamma: float = 0.25, stabilizer: float = 1e-6) -> LRPRule:
    """Generalised gamma (zennit): positive outputs use W + gamma W+ on x+ and W + gamma W- on x-, negative ones
    the reverse; biases follow the first term of each group."""
    return LRPRule("gamma", groups=(
        Group((Term("x+", "w+g+", "b+g+"), Term("x-", "w+g-", "zero")), mask="pos"),
        Group((Term("x+", "w+g-", "b+g-"), Term("x-", "w+g+", "zero")), mask="neg"),
    ), eps=stabilizer, gamma=gamma)


def ZBox(low, high, stabilizer: float = 1e-6) -> LRPRule:
    """z^B for the input layer; low/high per input channel (e.g. preprocess.input_bounds)."""
    low = tuple(float(v) for v in np.ravel(low))
    high = tuple(float(v) for v in np.ravel(high))
    return LRPRule("zbox", groups=(Group((Term("x", "w", "b"), Term("low", "w+", "b+", -1.0),
                                          Term("high", "w-", "b-", -1.0))),),
                   eps=stabilizer, low=low, high=high)


def Flat(stabilizer: float = 1e-6) -> LRPRule:
    return LRPRule("flat", groups=(Group((Term("ones", "ones", "zero"),)),), eps=stabilizer)


def WSquare(stabilizer: float = 1e-6) -> LRPRule:
    return LRPRule("wsquare", groups=(Group((Term("ones", "w2", "b2"),)),), eps=stabilizer)


def Pass() -> LRPRule:
    return LRPRule("pass", kind="pass")


def Norm(stabilizer: float = 1e-6) -> LRPRule:
    """Proportional redistribution: R_i = x_i R / stab(y) through Add/Sum/Sub and average pools. On a kept
    BatchNormalization (one not fused into a linear layer) it is the epsilon rule of the per-channel affine map,
    R_in = x * scale * R / stab(y), like zennit's Epsilon on a BatchNorm module: unlike Pass, the relevance stays
    proportional to the activation, which keeps a later Norm on a signed sum well conditioned."""
    return LRPRule("norm", kind="norm", eps=stabilizer)


def Gradient() -> LRPRule:
    """The plain vector-Jacobian product: winner-take-all MaxPool, shape ops, Concat (split), ReLU's gradient."""
    return LRPRule("gradient", kind="gradient")


def WinnerTakeAll() -> LRPRule:
    return LRPRule("wta", kind="gradient")


def Proportional(stabilizer: float = 1e-6) -> LRPRule:
    """MaxPool alternative: split each window's relevance in proportion to its inputs."""
    return LRPRule("proportional", kind="proportional", eps=stabilizer)


def Gate() -> LRPRule:
    """Mul: the gate (constant, or the Sigmoid/HardSigmoid branch) is held fixed; all relevance to the signal."""
    return LRPRule("gate", kind="gate")


RULE_FACTORIES = {
    "epsilon": lambda p: Epsilon(p.get("eps", p.get("epsilon", 1e-6))),
    "lrp0": lambda p: LRP0(), "lrp-0": lambda p: LRP0(), "zero": lambda p: LRP0(),
    "zplus": lambda p: ZPlus(p.get("stabilizer", 1e-6)), "z+": lambda p: ZPlus(p.get("stabilizer", 1e-6)),
    "alpha1beta0": lambda p: AlphaBeta(1, 0, p.get("stabilizer", 1e-6)),
    "alphabeta": lambda p: AlphaBeta(p.get("alpha", 2.0), p.get("beta", 1.0), p.get("stabilizer", 1e-6)),
    "alpha2beta1": lambda p: AlphaBeta(2, 1, p.get("stabilizer", 1e-6)),
    "gamma": lambda p: Gamma(p.get("gamma", 0.25), p.get("stabilizer", 1e-6)),
    "flat": lambda p: Flat(p.get("stabilizer", 1e-6)),
    "wsquare": lambda p: WSquare(p.get("stabilizer", 1e-6)), "w2": lambda p: WSquare(p.get("stabilizer", 1e-6)),
    "pass": lambda p: Pass(), "norm": lambda p: Norm(p.get("stabilizer", 1e-6)),
    "gradient": lambda p: Gradient(), "wta": lambda p: WinnerTakeAll(),
    "proportional": lambda p: Proportional(p.get("stabilizer", 1e-6)), "gate": lambda p: Gate(),
}


def make_rule(name: str, **params) -> LRPRule:
    """Rule by name; ZBox takes low/high. Unknown names raise ValueError listing the known ones."""
    key = name.lower().replace("_", "").replace(" ", "")
    key = {"epsilon0": "lrp0", "zb": "zbox", "box": "zbox", "alpha2beta1": "alpha2beta1"}.get(key, key)
    if key == "zbox":
        if params.get("low") is None or params.get("high") is None:
            raise ValueError("rule zbox needs low and high bounds")
        return ZBox(params["low"], params["high"], params.get("stabilizer", 1e-6))
    if key not in RULE_FACTORIES:
        raise ValueError(f"unknown LRP rule {name!r}; known: {', '.join(sorted(set(RULE_FACTORIES) | {'zbox'}))}")
    return RULE_FACTORIES[key](params)


# --- graph analysis -----------------------------------------------------------------------------------------

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


_NONNEG_PRESERVING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
                      "Squeeze", "Unsqueeze", "Transpose", "Concat", "Identity", "Dropout", "ReduceMean",
                      "ReduceMax", "Pad", "Split", "Slice", "Resize"}


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
        return numpy_helper.to_array(inits[name]) if name in inits else None

    for node in g.node:
        op = node.op_type
        if op in LINEAR_OPS and node.input[0] in live and len(node.input) > 1 and node.input[1] in inits:
            if op == "Gemm" and attrs(node).get("transA", 0):
                continue
            if op == "MatMul" and const(node.input[1]).ndim != 2:
                continue
            kind = "conv" if op == "Conv" else "dense"
            layer = LinearLayer(node.name, op, kind, out=node.output[0])
            w = const(node.input[1])
            channels = w.shape[0] if op == "Conv" else (
                w.shape[0] if op == "Gemm" and attrs(node).get("transB", 0) else w.shape[1])
            out_info = infos.get(node.output[0])
            rank = len(out_info.shape) if out_info is not None and out_info.shape is not None else (
                4 if op == "Conv" else 2)
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
                gate = [s is not None and s.op_type in ("Sigmoid", "HardSigmoid") for s in srcs]
                if gate[0] != gate[1]:
                    a.gates[node.name] = 1 if gate[0] else 0
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


# --- emission -----------------------------------------------------------------------------------------------

def _stab_div(b, r: str, z: str, eps: float, nonneg: bool = False, positive: str | None = None) -> str:
    """r / (z + eps * sign0(z)) with sign0(0) = +1 (zennit's stabiliser); eps = 0: r / z, and 0 where z = 0.

    nonneg: z is known >= 0, so sign0(z) = +1 everywhere and the Less/Where pair (the slowest part of the
    stabiliser in onnxruntime) is not needed; the values are the same. positive: relu(z), given where r is
    0 wherever z <= 0 (see positive_support); r / (relu(z) + eps) then has the same values."""
    if eps and nonneg:
        return b.add("Div", [r, b.add("Add", [z, b.const(eps)])])
    if eps and positive:
        return b.add("Div", [r, b.add("Add", [positive, b.const(eps)])])
    if eps:
        shift = b.add("Where", [b.add("Less", [z, b.const(0.0)]), b.const(-eps), b.const(eps)])
        return b.add("Div", [r, b.add("Add", [z, shift])])
    zero = b.add("Equal", [z, b.const(0.0)])
    safe = b.add("Where", [zero, b.const(1.0), z])
    return b.add("Where", [zero, b.const(0.0), b.add("Div", [r, safe])])


class _Linear:
    """Forward (modified weights) and transposed application of one Conv/Gemm/MatMul layer."""

    def __init__(self, b, node, layer: LinearLayer, analysis: LRPAnalysis):
        self.b, self.node, self.layer = b, node, layer
        op = node.op_type
        w = b.value(node.input[1]).astype(np.float64)
        bias = None
        if op == "Conv":
            if len(node.input) > 2 and node.input[2]:
                bias = self._const(node.input[2]).reshape(-1)
            self.w = w  # (M, C/g, k...)
        elif op == "Gemm":
            a = attrs(node)
            wt = w.T if a.get("transB", 0) else w
            self.w = wt * a.get("alpha", 1.0)  # (K, M)
            if len(node.input) > 2 and node.input[2]:
                c = self._const(node.input[2])
                if c.size not in (1, self.w.shape[1]):
                    raise GraphPassError(f"{node.name} (Gemm): LRP needs a bias broadcast along the outputs")
                bias = np.broadcast_to(c.reshape(-1), (self.w.shape[1],)) * a.get("beta", 1.0)
        else:
            self.w = w  # (K, M)
        channels = self.w.shape[0] if op == "Conv" else self.w.shape[1]
        scale, shift = np.ones(channels), np.zeros(channels)
        for tail_name in layer.tails:
            tail = analysis.nodes[tail_name]
            if tail.op_type == "Add":
                other = next(i for i in tail.input if b.value(i) is not None)
                shift = shift + _channel_vector(b.value(other), layer.kind, 4 if op == "Conv" else 2, channels)
            else:  # BatchNormalization
                gamma, beta, mean, var = (b.value(i).astype(np.float64) for i in tail.input[1:5])
                s = gamma / np.sqrt(var + attrs(tail).get("epsilon", 1e-5))
                scale, shift = scale * s, shift * s + beta - mean * s
        # (initializer, transB) computing s @ W^T from the graph's own weight; None once the weight is rescaled
        self.original_weight = None
        if op != "Conv" and not layer.tails and (op == "MatMul" or attrs(node).get("alpha", 1.0) == 1.0):
            self.original_weight = (node.input[1], 0 if op == "Gemm" and attrs(node).get("transB", 0) else 1)
        if layer.tails:
            if op == "Conv":
                self.w = self.w * scale.reshape((-1,) + (1,) * (self.w.ndim - 1))
            else:
                self.w = self.w * scale[None, :]
            bias = (np.zeros(channels) if bias is None else bias) * scale + shift
        self.bias = bias
        self._fwd_cache: dict = {}

    def _const(self, name):
        v = self.b.value(name)
        if v is None:
            raise GraphPassError(f"{self.node.name} ({self.node.op_type}): LRP needs constant weights and bias")
        return v.astype(np.float64)

    def weight(self, mod: str, gamma: float) -> np.ndarray:
        w = self.w
        return {"w": lambda: w, "w+": lambda: np.maximum(w, 0), "w-": lambda: np.minimum(w, 0),
                "ones": lambda: np.ones_like(w), "w2": lambda: w * w,
                "w+g+": lambda: w + gamma * np.maximum(w, 0), "w+g-": lambda: w + gamma * np.minimum(w, 0)}[mod]()

    def biasv(self, mod: str, gamma: float):
        c = self.bias
        if c is None or mod == "zero":
            return None
        return {"b": lambda: c, "b+": lambda: np.maximum(c, 0), "b-": lambda: np.minimum(c, 0),
                "b2": lambda: c * c, "b+g+": lambda: c + gamma * np.maximum(c, 0),
                "b+g-": lambda: c + gamma * np.minimum(c, 0)}[mod]()

    def forward(self, inp: str, w: np.ndarray, bias, shift: float = 0.0) -> str:
        """W inp + bias (+ shift: a stabiliser folded into the bias, which the Conv / Add applies for free)."""
        b, node = self.b, self.node
        if shift:
            channels = w.shape[0] if node.op_type == "Conv" else w.shape[1]
            bias = (np.zeros(channels) if bias is None else bias) + shift
        if node.op_type == "Conv":
            ins = [inp, b.const(w)] + ([b.const(bias)] if bias is not None else [])
            return b.add("Conv", ins, **{k: v for k, v in attrs(node).items()})
        y = b.add("MatMul", [inp, b.const(w)])
        return b.add("Add", [y, b.const(bias)]) if bias is not None else y

    def transpose(self, s: str, w: np.ndarray, kind: str = "") -> str:
        """W^T s for the (modified) weight w; `kind` "w" with no fused tail may reuse the graph's own weight."""
        b, node = self.b, self.node
        group = attrs(node).get("group", 1) if node.op_type == "Conv" else 1
        if group == 1 and w.size > 1 and np.all(w == w.flat[0]):
            # a constant weight (flat rule): every output channel gets the same W^T s, which depends on s only
            # through its channel sum, so transpose that one channel (64x less work on a ResNet's first layer)
            if node.op_type == "Conv":  # a 1x1 Conv sums channels ~3x faster than ReduceSum in onnxruntime
                s = b.add("Conv", [s, b.const(np.ones((1, w.shape[0]) + (1,) * (w.ndim - 2), np.float32))])
                w = w[:1]
            else:
                s = b.add("ReduceSum", [s, b.const(np.array([-1], np.int64), np.int64)], keepdims=1)
                w = w[:, :1]
        if node.op_type == "Conv":
            from .vjp_rules import _spatial, _transpose_geometry

            kernel = list(attrs(node).get("kernel_shape", w.shape[2:]))
            xs, ys, strides, dil, begins, ends = _spatial(b, node, node.input[0], node.output[0], kernel)
            k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
            if all(st == 1 for st in strides) and all(0 <= p <= k - 1 for p, k in zip(begins + ends, k_eff * 2)):
                # stride 1: the transpose is a Conv with the flipped kernel, transposed per group and padded
                # k_eff - 1 - pad; onnxruntime runs Conv several times faster than ConvTranspose (5x for 1x1)
                m, cg = w.shape[:2]
                wt = w.reshape((group, m // group, cg) + w.shape[2:]).swapaxes(1, 2)
                wt = wt[(slice(None),) * 3 + (slice(None, None, -1),) * len(kernel)]
                wt = np.ascontiguousarray(wt.reshape((group * cg, m // group) + w.shape[2:]))
                pads = [k - 1 - p for k, p in zip(k_eff, begins)] + [k - 1 - p for k, p in zip(k_eff, ends)]
                return b.add("Conv", [s, b.const(wt)], dilations=dil, pads=pads, group=group, kernel_shape=kernel)
            pads, out_pad = _transpose_geometry(xs, ys, kernel, strides, dil, begins, ends)
            return b.add("ConvTranspose", [s, b.const(w)], strides=strides, dilations=dil, pads=pads,
                         output_padding=out_pad, group=group, kernel_shape=kernel)
        shape = b.shape(node.output[0])  # s is shaped like the layer's output
        if kind == "w" and self.original_weight is not None and shape is not None and len(shape) == 2:
            # the unmodified weight is already an initializer: Gemm reads it transposed instead of a copy
            name, trans_b = self.original_weight
            return b.add("Gemm", [s, name], transB=trans_b)
        return b.add("MatMul", [s, b.const(np.ascontiguousarray(w.T))])


def _input_tensor(b, kind: str, x: str, rule: LRPRule, nonneg: bool, cache: dict) -> str | None:
    """The modified input; None where it is identically zero (x- of a non-negative tensor)."""
    if kind in cache:
        return cache[kind]
    if kind == "x" or (kind == "x+" and nonneg):
        out = x
    elif kind == "x+":
        out = b.add("Relu", [x])
    elif kind == "x-":
        out = None if nonneg else b.add("Min", [x, b.const(0.0)])
    else:
        shape = b.shape(x)
        static = shape is not None and all(d is not None for d in shape[1:])
        if kind == "ones":
            if static:
                out = b.const(np.ones((1,) + tuple(shape[1:]), np.float32))
            else:
                out = b.add("ConstantOfShape", [b.add("Shape", [x])],
                            value=numpy_helper.from_array(np.ones(1, np.float32)))
        else:  # low / high: per-channel bounds over the whole (static) input, zero padding as zennit
            values = np.asarray(rule.low if kind == "low" else rule.high, np.float64)
            if not static or len(shape) < 2:
                raise GraphPassError(f"{b.node.name}: the zbox rule needs a static input shape")
            c = shape[1]
            if values.size not in (1, c):
                raise GraphPassError(f"{b.node.name}: zbox bounds have {values.size} values for {c} channels")
            arr = np.broadcast_to(values.reshape((1, -1) + (1,) * (len(shape) - 2)) if values.size == c
                                  else values.reshape(()), (1,) + tuple(shape[1:]))
            out = b.const(np.ascontiguousarray(arr, np.float32))
    cache[kind] = out
    return out


_INPUT_SIGN = {"x+": 1, "x-": -1, "ones": 1}
_WEIGHT_SIGN = {"w+": 1, "w-": -1, "ones": 1, "w2": 1}
_BIAS_SIGN = {"zero": 0, "b+": 1, "b-": -1, "b2": 1}


def _group_nonneg(group: Group, nonneg_input: bool, has_bias: bool) -> bool:
    """Whether every term of z = sum_t sign_t (in_t W_t + b_t) is provably >= 0 (z+, flat, w^2, ...)."""
    for t in group.terms:
        s_in = 1 if t.input == "x" and nonneg_input else _INPUT_SIGN.get(t.input)
        s_w = _WEIGHT_SIGN.get(t.weight)
        if s_in is None or s_w is None or t.sign * s_in * s_w < 0:
            return False
        s_b = _BIAS_SIGN.get(t.bias) if has_bias else 0
        if s_b is None or t.sign * s_b < 0:
            return False
    return True


def _relu_of(b, y: str, analysis: LRPAnalysis) -> str:
    """relu(y): the graph's own Relu of y where there is one (already computed by the forward), else a new one."""
    for n in analysis.nodes.values():
        if n.op_type == "Relu" and n.input[0] == y:
            return n.output[0]
    return b.add("Relu", [y])


def _compile_linear(rule: LRPRule, layer: LinearLayer, analysis: LRPAnalysis, support: set = frozenset()):
    def emit(b, node, gy, want):
        R = gy[0]
        out = [None] * len(node.input)
        if R is None or not want[0]:
            return out
        lin = _Linear(b, node, layer, analysis)
        x = node.input[0]
        nonneg = x in analysis.nonneg
        y = layer.out
        inputs: dict = {}
        fwd: dict = {}
        contributions: dict = {}  # (input kind, weight kind) -> list of scaled s
        for group in rule.groups:
            # z >= 0 by construction (z+, flat, w^2...): sign0(z) = +1, so the stabiliser is a plain + eps, folded
            # into the bias of the group's first forward term
            nonneg_z = (bool(rule.eps) and not rule.reuses_forward
                        and _group_nonneg(group, nonneg, lin.bias is not None))
            folded = False
            if rule.reuses_forward:
                z = y
            else:
                parts = []
                for t in group.terms:
                    inp = _input_tensor(b, t.input, x, rule, nonneg, inputs)
                    if inp is None:
                        continue
                    shift = rule.eps if nonneg_z and not parts and t.sign > 0 else 0.0
                    folded = folded or bool(shift)
                    key = (t.input, t.weight, t.bias, shift)
                    if key not in fwd:
                        fwd[key] = lin.forward(inp, lin.weight(t.weight, rule.gamma), lin.biasv(t.bias, rule.gamma),
                                               shift)
                    parts.append(fwd[key] if t.sign > 0 else b.add("Neg", [fwd[key]]))
                if not parts:
                    continue
                z = parts[0] if len(parts) == 1 else b.add("Sum", parts)
            r = R
            if group.mask:
                cond = b.add("Greater" if group.mask == "pos" else "Less", [y, b.const(0.0)])
                r = b.add("Where", [cond, R, b.const(0.0)])
            positive = (_relu_of(b, y, analysis) if rule.reuses_forward and y in support and y not in analysis.nonneg
                        else None)
            s = b.add("Div", [r, z]) if folded else _stab_div(b, r, z, rule.eps, nonneg=nonneg_z, positive=positive)
            for t in group.terms:
                if _input_tensor(b, t.input, x, rule, nonneg, inputs) is None:
                    continue
                contributions.setdefault((t.input, t.weight), []).append((group.coef * t.sign, s))
        per_input: dict = {}
        for (ikind, wkind), ss in contributions.items():
            w = lin.weight(wkind, rule.gamma)
            if len(ss) == 1:  # a lone coefficient rides on the transposed weight
                factor, s_sum = ss[0]
                if factor != 1.0:
                    w, wkind = w * factor, f"{factor:g}*{wkind}"
            else:
                s_sum = b.add("Sum", [st if f == 1.0 else b.add("Mul", [st, b.const(f)]) for f, st in ss])
            per_input.setdefault(ikind, []).append(lin.transpose(s_sum, w, wkind))
        terms = []
        for ikind, gs in per_input.items():
            gsum = gs[0] if len(gs) == 1 else b.add("Sum", gs)
            inp = inputs[ikind]
            terms.append(gsum if ikind == "ones" else b.add("Mul", [inp, gsum]))
        if not terms:
            out[0] = b.zeros_like(x)
        else:
            out[0] = terms[0] if len(terms) == 1 else b.add("Sum", terms)
        return out
    return emit


def _compile_pass(b, node, gy, want):
    return [gy[0]] + [None] * (len(node.input) - 1)


def _compile_norm(rule: LRPRule, analysis: LRPAnalysis, support: set = frozenset()):
    def emit(b, node, gy, want):
        from . import vjp_rules

        R, y, op = gy[0], node.output[0], node.op_type
        nonneg = y in analysis.nonneg
        positive = _relu_of(b, y, analysis) if y in support and not nonneg and rule.eps else None
        s = _stab_div(b, R, y, rule.eps, nonneg=nonneg, positive=positive)
        if op in ("Add", "Sum", "Sub"):
            out = []
            for i, (x, w) in enumerate(zip(node.input, want)):
                if not w:
                    out.append(None)
                    continue
                contrib = b.add("Mul", [x, s])
                if op == "Sub" and i == 1:
                    contrib = b.add("Neg", [contrib])
                out.append(b.unbroadcast(contrib, x, y))
            return out
        g = vjp_rules.PLAIN[op](b, node, [s], want)
        return [b.add("Mul", [node.input[0], g[0]])] + list(g[1:])
    return emit


def _compile_proportional(rule: LRPRule):
    def emit(b, node, gy, want):
        from .vjp_rules import _spatial, _transpose_geometry

        a = attrs(node)
        if a.get("ceil_mode", 0):
            raise GraphPassError(f"{node.name} (MaxPool): proportional rule does not support ceil_mode")
        kernel = list(a["kernel_shape"])
        x = node.input[0]
        xs, ys, strides, dil, begins, ends = _spatial(b, node, x, node.output[0], kernel)
        c = b.static_shape(x, "proportional pooling")[1]
        ones = b.const(np.ones([c, 1] + kernel, np.float32))
        z = b.add("Conv", [x, ones], strides=strides, dilations=dil, pads=list(begins) + list(ends),
                  group=c, kernel_shape=kernel)
        s = _stab_div(b, gy[0], z, rule.eps)
        pads, out_pad = _transpose_geometry(xs, ys, kernel, strides, dil, begins, ends)
        g = b.add("ConvTranspose", [s, ones], strides=strides, dilations=dil, pads=pads, output_padding=out_pad,
                  group=c, kernel_shape=kernel)
        return [b.add("Mul", [x, g])] + [None] * (len(node.output) - 1 + len(node.input) - 1)
    return emit


def _compile_gate(signal: int):
    def emit(b, node, gy, want):
        out = [None] * len(node.input)
        if signal >= 0 and want[signal]:
            out[signal] = b.unbroadcast(gy[0], node.input[signal], node.output[0])
        return out
    return emit


PASS_OPS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "PRelu",
            "Softplus", "Gelu", "Identity", "Dropout", "BatchNormalization", "Div", "Cast", "Neg"}
NORM_OPS = {"Add", "Sum", "Sub", "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum"}
STRUCTURAL_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Pad", "MaxPool",
                  "Identity", "Dropout", "Cast"}


def base_rule(node: onnx.NodeProto, analysis: LRPAnalysis, stabilizer: float = 1e-6) -> LRPRule | None:
    """The default for non-linear nodes (zennit's layer_map_base): activations and kept BatchNorm pass,
    residual Add and average pools Norm, MaxPool winner-take-all, shape ops route; None = no rule."""
    op = node.op_type
    if node.name in analysis.tail_of:
        return Pass()
    if op == "MaxPool":
        return WinnerTakeAll()
    if op in STRUCTURAL_OPS:
        return Gradient()
    if op == "Mul":
        return Gate() if node.name in analysis.gates else None
    if op == "Div":
        return Pass() if len(node.input) > 1 and node.input[1] not in analysis.activations else None
    if op in NORM_OPS:
        return Norm(stabilizer)
    if op in PASS_OPS:
        return Pass()
    return None


def check_rule(rule: LRPRule, node: onnx.NodeProto, analysis: LRPAnalysis) -> None:
    op = node.op_type
    ok = {
        "linear": node.name in analysis.linear,
        "pass": op in PASS_OPS or node.name in analysis.tail_of,
        "norm": op in NORM_OPS or (op == "BatchNormalization" and node.name not in analysis.tail_of),
        "gradient": op in _gradient_ops(),
        "proportional": op == "MaxPool",
        "gate": op == "Mul" and node.name in analysis.gates,
    }[rule.kind]
    if not ok:
        raise GraphPassError(f"rule {rule.name!r} cannot apply to node {node.name} ({op})")


def _gradient_ops():
    from .vjp_rules import PLAIN

    return set(PLAIN)


def compile_rules(rules: Mapping[str, LRPRule], analysis: LRPAnalysis, start: str | None = None) -> dict:
    """node name -> append_vjp rule function; `start` is the tensor the initial relevance is seeded at."""
    from .vjp_rules import PLAIN

    support = positive_support(rules, analysis, start)
    out = {}
    for name, rule in rules.items():
        node = analysis.nodes[name]
        check_rule(rule, node, analysis)
        if rule.kind == "linear":
            out[name] = _compile_linear(rule, analysis.linear[name], analysis, support)
        elif rule.kind == "pass":
            out[name] = _compile_pass
        elif rule.kind == "norm":
            out[name] = _compile_norm(rule, analysis, support)
        elif rule.kind == "gradient":
            out[name] = PLAIN[node.op_type]
        elif rule.kind == "proportional":
            out[name] = _compile_proportional(rule)
        elif rule.kind == "gate":
            out[name] = _compile_gate(analysis.gates[name])
    return out


def append_lrp(model: onnx.ModelProto, output: str, at: list[str], *, seed: str | None,
               rules: Mapping[str, LRPRule], analysis: LRPAnalysis | None = None, prefix: str = "lrp/",
               record: list | None = None) -> onnx.ModelProto:
    """Append relevance propagation from `output` (initial relevance `seed`) to the tensors `at`.

    `rules` maps node names to LRPRules (see onnx_saliency.lrp composites). Outputs are
    ``grad_name(t)`` for t in `at`. Nodes on the path without a rule raise UnsupportedOpsError (one line, all
    nodes) before anything is emitted. With `record` (a list), every node's relevance in and out is also
    exposed as outputs and (node, output names, input names) tuples appended to it (per-layer conservation).
    """
    analysis = analysis or analyze(model)
    compiled = compile_rules(rules, analysis, start=output)
    if record is not None:
        compiled = {k: _recording(k, f, record) for k, f in compiled.items()}
    shaped: dict = {}  # relevance tensor -> the forward tensor it has the shape of
    compiled = {k: _shape_noting(f, shaped) for k, f in compiled.items()}
    m = append_vjp(model, output, list(at), seed=seed, rules={}, node_rules=compiled, prefix=prefix)
    _annotate_shapes(m, shaped)
    if record is not None:
        from onnx import helper

        names = {o.name for o in m.graph.output}
        for _, outs, ins in record:
            for t in outs + ins:
                if t not in names:
                    m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
                    names.add(t)
    return m


def _shape_noting(fn, shaped: dict):
    def emit(b, node, gy, want):
        res = fn(b, node, gy, want)
        for r, x, w in zip(res, node.input, want):
            if r is not None and w:
                shaped.setdefault(r, x)
        return res
    return emit


def _annotate_shapes(m: onnx.ModelProto, shaped: dict) -> None:
    """Declare each node's relevance tensor with its forward tensor's type and shape.

    Shape inference loses the shape behind ops whose output shape is data (Reshape / Expand to Shape(x) in the
    pooling and flatten backward rules), and with it every relevance tensor further down. onnxruntime's NCHWc
    layout pass then cannot prove that x and the relevance have one shape and reorders both around each
    R_in = x * (W^T s) (about a fifth of the relevance graph's time on ResNet-50); the declared shape keeps them
    in the blocked layout. Only metadata: a relevance tensor always has the shape of its forward tensor."""
    g = m.graph
    known = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
    taken = set(known)
    for r, x in shaped.items():
        vi = known.get(x)
        if (r in taken or vi is None or not vi.type.tensor_type.HasField("shape")
                or vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT):
            continue
        new = g.value_info.add()
        new.CopyFrom(vi)
        new.name = r
        taken.add(r)


def _recording(name, fn, record):
    def emit(b, node, gy, want):
        res = fn(b, node, gy, want)
        outs = [b.add("Identity", [g]) for g in gy if g is not None]
        ins = [b.add("Identity", [r]) for r, w in zip(res, want) if r is not None and w]
        record.append((name, outs, ins))
        return res
    return emit


__all__ = ["Term", "Group", "LRPRule", "Epsilon", "LRP0", "ZPlus", "AlphaBeta", "Gamma", "ZBox", "Flat", "WSquare",
           "Pass", "Norm", "Gradient", "WinnerTakeAll", "Proportional", "Gate", "make_rule", "analyze",
           "LRPAnalysis", "LinearLayer", "append_lrp", "base_rule", "compile_rules", "LINEAR_OPS"]
