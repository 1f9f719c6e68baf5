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

import numpy as np
import onnx
from onnx import numpy_helper

from .._graph import GraphPassError, attrs
from ..vjp import append_vjp
from ..vjp import rules as vjp_rules
from .analysis import LinearLayer, LRPAnalysis, _channel_vector, analyze, positive_support
from .rules import Gate, Gradient, Group, LRPRule, Norm, Pass, Uniform, WinnerTakeAll
from ..vjp._emit import rank_of, reduce_mean

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


def _channels(op: str, w: np.ndarray, group: int) -> int:
    return w.shape[0] if op == "Conv" else w.shape[1] * group if op == "ConvTranspose" else w.shape[1]


def _per_output_channel(op: str, w: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """w with each output channel's weights multiplied by scale[channel] (the fused tail's affine scale)."""
    if op == "Conv":
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if op == "ConvTranspose":  # (C_in, M / group, k...): input channel c feeds outputs of group c // (C_in / group)
        per = np.repeat(scale.reshape(group, 1, -1), w.shape[0] // group, axis=1).reshape(w.shape[:2])
        return w * per.reshape(w.shape[:2] + (1,) * (w.ndim - 2))
    return w * scale[None, :]


# Exact float32 counterparts of weight()'s float64 modifiers (max/min with 0 and the identity are exact in both)
_FOLDABLE = {"w": lambda w: w, "w+": lambda w: np.maximum(w, 0), "w-": lambda w: np.minimum(w, 0)}
_CHUNK = 1 << 16  # values per step of the constant check (one page of a file-mapped weight first)


class _Folded:
    """A modified weight (w, w+, w-) spelled as nodes on the layer's stored initializer: Relu for w+, Min with 0
    for w-; a Transpose for a dense layer's other orientation, a Transpose and a flipping Slice for a stride-1
    Conv's transpose. onnxruntime folds them once, when it builds the session, into memory of its own.

    numpy never computes, hashes or holds the modified weight. The weight store's copy was pure overhead:
    onnxruntime copies what it is handed as an external initializer (a 392 MiB MatMul weight: +401 MiB at
    session creation, even with every optimisation off), and re-lays out Conv weights into its blocked (NCHWc)
    format anyway. On ResNet-50 the store held 180 MB of W+ and flipped W+^T besides onnxruntime's copies; on
    VGG-16 z+ made a float64 copy of fc6 (822 MB) on top. The values are exactly those weight() computes in
    float64 and the graph casts to float32 (max / min with 0, transposes and flips are exact in both)."""

    def __init__(self, name: str, raw: np.ndarray, mod: str, stored_mk: bool = False):
        self.name, self.raw, self.mod, self.stored_mk = name, raw, mod, stored_mk
        self.shape, self.size, self.ndim = tuple(raw.shape), int(raw.size), raw.ndim
        self._transposed = None

    def is_constant(self) -> bool:
        return _is_constant(self.raw, _FOLDABLE[self.mod])

    def dense(self, b, transposed: bool) -> str:
        """A dense layer's weight as (K, M), or as (M, K) when `transposed` (`raw` is (K, M); the stored
        initializer is (M, K) where stored_mk)."""
        if transposed == self.stored_mk:
            return self.name
        if self._transposed is None:
            self._transposed = b.add("Transpose", [self.name], perm=[1, 0])
        return self._transposed


def _is_constant(w: np.ndarray, f=lambda v: v) -> bool:
    """np.all(f(w) == f(w).flat[0]), chunk by chunk: a weight that varies is told after its first chunk, so
    neither a weight-sized temporary is made nor a file-mapped weight read into memory (VGG-16's 400 MB fc6
    was, for the flat rule's check; only that rule's weights are constant)."""
    flat = np.ravel(w, order="K")  # in memory order: a view, also of a transposed weight (all-equal has no order)
    first = f(flat[:1])[0]
    for start in range(0, flat.size, _CHUNK):
        if not np.all(f(flat[start:start + _CHUNK]) == first):
            return False
    return True


def _weight_input(b, w) -> str:
    return w.name if isinstance(w, _Folded) else b.const(w)


def _flipped_transpose(b, name: str, shape: tuple, group: int) -> str:
    """The stride-1 transposed Conv's kernel as nodes on the kernel `name` (shaped `shape`), folded by
    onnxruntime: per group, (M/g, C/g, k...) -> (C/g, M/g, k...) with every spatial axis reversed."""
    m, cg = shape[:2]
    k = list(shape[2:])
    t = name
    if group > 1:
        t = b.add("Reshape", [t, b.const([group, m // group, cg] + k, np.int64)])
    lead = 1 if group > 1 else 0
    perm = list(range(lead + 2 + len(k)))
    perm[lead], perm[lead + 1] = perm[lead + 1], perm[lead]
    t = b.add("Transpose", [t], perm=perm)
    flip = [lead + 2 + i for i, d in enumerate(k) if d > 1]
    if flip:
        n = len(flip)
        t = b.add("Slice", [t, b.const([-1] * n, np.int64), b.const([np.iinfo(np.int64).min] * n, np.int64),
                            b.const(flip, np.int64), b.const([-1] * n, np.int64)])
    if group > 1:
        t = b.add("Reshape", [t, b.const([group * cg, m // group] + k, np.int64)])
    return t


class _Linear:
    """Forward (modified weights) and transposed application of one Conv/ConvTranspose/Gemm/MatMul layer."""

    def __init__(self, b, node, layer: LinearLayer, analysis: LRPAnalysis, fuse_tails: bool = True):
        self.b, self.node, self.layer = b, node, layer
        op = node.op_type
        # the stored weight itself, in self.w's layout; self.w (float64) is computed on first use only: a dense
        # layer whose rule reads the unmodified weight never needs it (VGG-16's fc6 would be 822 MB)
        raw = b.value(node.input[1])
        bias = None
        self._w, self._alpha = None, None
        self.group = attrs(node).get("group", 1) if op in ("Conv", "ConvTranspose") else 1
        if op in ("Conv", "ConvTranspose"):
            if len(node.input) > 2 and node.input[2]:
                bias = self._const(node.input[2]).reshape(-1)
            self._raw = raw  # Conv (M, C/g, k...), ConvTranspose (C, M/g, k...)
        elif op == "Gemm":
            a = attrs(node)
            self._raw = raw.T if a.get("transB", 0) else raw  # (K, M)
            self._alpha = a.get("alpha", 1.0)
            if len(node.input) > 2 and node.input[2]:
                c = self._const(node.input[2])
                if c.size not in (1, self._raw.shape[1]):
                    raise GraphPassError(f"{node.name} (Gemm): LRP needs a bias broadcast along the outputs")
                bias = np.broadcast_to(c.reshape(-1), (self._raw.shape[1],)) * a.get("beta", 1.0)
        else:
            self._raw = raw  # (K, M)
        channels = _channels(op, self._raw, self.group)
        scale, shift = np.ones(channels), np.zeros(channels)
        for tail_name in layer.tails:
            tail = analysis.nodes[tail_name]
            if tail.op_type == "Add":
                other = next(i for i in tail.input if b.value(i) is not None)
                shift = shift + _channel_vector(b.value(other), layer.kind, 4 if layer.kind == "conv" else 2,
                                                channels)
            else:  # BatchNormalization
                gamma, beta, mean, var = (b.value(i).astype(np.float64) for i in tail.input[1:5])
                s = gamma / np.sqrt(var + attrs(tail).get("epsilon", 1e-5))
                scale, shift = scale * s, shift * s + beta - mean * s
        # (initializer, transB) computing s @ W^T from the graph's own weight; None once the weight is rescaled
        self.original_weight = None
        if layer.kind == "dense" and not layer.tails and (op == "MatMul" or attrs(node).get("alpha", 1.0) == 1.0):
            self.original_weight = (node.input[1], 0 if op == "Gemm" and attrs(node).get("transB", 0) else 1)
        self._fused = bool(layer.tails and fuse_tails)
        self._folded: dict = {}
        if self._fused:
            self._w = _per_output_channel(op, self.w, scale, self.group)
            bias = (np.zeros(channels) if bias is None else bias) * scale + shift
        self.bias = bias
        self._fwd_cache: dict = {}

    @property
    def w(self) -> np.ndarray:
        """The layer's weight in float64, (K, M) for dense layers (alpha applied; a fused tail's scale too)."""
        if self._w is None:
            w = self._raw.astype(np.float64)
            self._w = w * self._alpha if self._alpha is not None else w
        return self._w

    def unmodified_weight(self) -> np.ndarray:
        """What weight("w") holds, as stored (float32, no copy); only where original_weight is set (no tail,
        alpha 1), so that its values are exactly weight("w")'s."""
        return self._raw

    def _const(self, name):
        v = self.b.value(name)
        if v is None:
            raise GraphPassError(f"{self.node.name} ({self.node.op_type}): LRP needs constant weights and bias")
        return v.astype(np.float64)

    def graph_weight(self, mod: str, gamma: float):
        """weight(mod) for emission: a _Folded weight where it is exactly the stored weight under w / w+ / w- (a
        Conv or dense layer, no fused tail, alpha 1, float32), else the numpy array weight() computes."""
        op = self.node.op_type
        dense = op in ("Gemm", "MatMul") and self._alpha in (None, 1.0)
        if mod not in _FOLDABLE or self._fused or self._raw.dtype != np.float32 or not (dense or op == "Conv"):
            return self.weight(mod, gamma)
        if mod not in self._folded:
            name = self.node.input[1]
            if mod == "w+":
                name = self.b.add("Relu", [name])
            elif mod == "w-":
                name = self.b.add("Min", [name, self.b.const(0.0)])
            stored_mk = op == "Gemm" and bool(attrs(self.node).get("transB", 0))
            self._folded[mod] = _Folded(name, self._raw, mod, stored_mk)
        return self._folded[mod]

    def weight(self, mod: str, gamma: float) -> np.ndarray:
        if mod == "ones":  # the shape is all it needs: no float64 copy of the weight
            return np.ones(self._raw.shape)
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
            channels = _channels(node.op_type, w, self.group)
            bias = (np.zeros(channels) if bias is None else bias) + shift
        if node.op_type in ("Conv", "ConvTranspose"):
            ins = [inp, _weight_input(b, w)] + ([b.const(bias)] if bias is not None else [])
            return b.add(node.op_type, ins, **{k: v for k, v in attrs(node).items()})
        if isinstance(w, _Folded) and w.stored_mk:  # a Gemm's (M, K) weight, read transposed: no (K, M) copy
            y = b.add("Gemm", [inp, w.name], transB=1)
        else:
            y = b.add("MatMul", [inp, w.dense(b, False) if isinstance(w, _Folded) else b.const(w)])
        return b.add("Add", [y, b.const(bias)]) if bias is not None else y

    def transpose(self, s: str, w: np.ndarray, kind: str = "") -> str:
        """W^T s for the (modified) weight w; `kind` "w" with no fused tail may reuse the graph's own weight."""
        b, node = self.b, self.node
        group = self.group
        if node.op_type == "ConvTranspose":
            return vjp_rules.conv_transpose_adjoint(b, node, s, b.const(w))
        if isinstance(w, _Folded) and group == 1 and w.size > 1 and w.is_constant():
            w = self.weight(w.mod, 0.0)  # the flat rule's kind of weight: the channel-sum path below, in numpy
        if group == 1 and w.size > 1 and not isinstance(w, _Folded) and _is_constant(w):
            # a constant weight (flat rule): every output channel gets the same W^T s, which depends on s only
            # through its channel sum, so transpose that one channel (64x less work on a ResNet's first layer)
            if node.op_type == "Conv":  # a 1x1 Conv sums channels ~3x faster than ReduceSum in onnxruntime
                s = b.add("Conv", [s, b.const(np.ones((1, w.shape[0]) + (1,) * (w.ndim - 2), np.float32))])
                w = w[:1]
            else:
                s = b.add("ReduceSum", [s, b.const(np.array([-1], np.int64), np.int64)], keepdims=1)
                w = w[:, :1]
        if node.op_type == "Conv":
            kernel = list(attrs(node).get("kernel_shape", w.shape[2:]))
            xs, ys, strides, dil, begins, ends = vjp_rules._spatial(b, node, node.input[0], node.output[0], kernel)
            k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
            if all(st == 1 for st in strides) and all(0 <= p <= k - 1 for p, k in zip(begins + ends, k_eff * 2)):
                # stride 1: the transpose is a Conv with the flipped kernel, transposed per group and padded
                # k_eff - 1 - pad; onnxruntime runs Conv several times faster than ConvTranspose (5x for 1x1)
                # a numpy weight (gamma, w^2, fused tails) is the forward's constant too: only it is stored
                wt = _flipped_transpose(b, _weight_input(b, w), w.shape, group)
                pads = [k - 1 - p for k, p in zip(k_eff, begins)] + [k - 1 - p for k, p in zip(k_eff, ends)]
                return b.add("Conv", [s, wt], dilations=dil, pads=pads, group=group, kernel_shape=kernel)
            pads, out_pad = vjp_rules._transpose_geometry(xs, ys, kernel, strides, dil, begins, ends)
            return b.add("ConvTranspose", [s, _weight_input(b, w)], strides=strides, dilations=dil, pads=pads,
                         output_padding=out_pad, group=group, kernel_shape=kernel)
        shape = b.shape(node.output[0])  # s is shaped like the layer's output
        if kind == "w" and self.original_weight is not None and shape is not None and len(shape) == 2:
            # the unmodified weight is already an initializer: Gemm reads it transposed instead of a copy
            name, trans_b = self.original_weight
            return b.add("Gemm", [s, name], transB=trans_b)
        if isinstance(w, _Folded):
            return b.add("MatMul", [s, w.dense(b, True)])
        return b.add("MatMul", [s, b.add("Transpose", [b.const(w)], perm=[1, 0])])


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
        lin = _Linear(b, node, layer, analysis, fuse_tails=rule.tails != "pass")
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
                        fwd[key] = lin.forward(inp, lin.graph_weight(t.weight, rule.gamma),
                                               lin.biasv(t.bias, rule.gamma), shift)
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
            if wkind == "w" and len(ss) == 1 and ss[0][0] == 1.0 and lin.original_weight is not None:
                w = lin.unmodified_weight()  # transpose() reads the graph's own initializer: no float64 copy
            else:
                w = lin.graph_weight(wkind, rule.gamma)
            if len(ss) == 1:  # a lone coefficient rides on the transposed weight
                factor, s_sum = ss[0]
                if factor != 1.0:
                    w = lin.weight(wkind, rule.gamma) if isinstance(w, _Folded) else w
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
    """All relevance to the first input that carries any (the data input; for a bias Add exported as
    Add(bias, x), as torch's legacy exporter writes Linear layers, that is the second)."""
    out = [None] * len(node.input)
    target = next((i for i, w in enumerate(want) if w), None)
    if target is not None:
        out[target] = b.unbroadcast(gy[0], node.input[target], node.output[0]) if target else gy[0]
    return out


def _compile_norm(rule: LRPRule, analysis: LRPAnalysis, support: set = frozenset()):
    def emit(b, node, gy, want):
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
        # any other linear map in its (single) activation operand: R_x = x * J^T s
        g = vjp_rules.PLAIN[op](b, node, [s], want)
        return [b.add("Mul", [x, gi]) if gi is not None and w else None for x, gi, w in zip(node.input, g, want)]
    return emit


def _compile_uniform(rule: LRPRule, analysis: LRPAnalysis):
    """A product of two activations: each operand's z-rule share x (.) J_x^T (R / stab(y)), halved (uniform), or
    with CP-LRP all to the operand that is not the attention probabilities."""
    stop = bool(rule.groups) and rule.groups[0].mask == "stop-attention"

    def emit(b, node, gy, want):
        R, y = gy[0], node.output[0]
        held = analysis.products.get(node.name, -1) if stop else -1
        shares = [0.0 if i == held else (1.0 if held >= 0 else 0.5) for i in range(len(node.input))]
        want = [w and share > 0 for w, share in zip(want, shares)]
        if not any(want):
            return [None] * len(node.input)
        s = _stab_div(b, R, y, rule.eps)
        g = vjp_rules.PLAIN[node.op_type](b, node, [s], want)
        out = []
        for x, gi, w, share in zip(node.input, g, want, shares):
            if gi is None or not w:
                out.append(None)
                continue
            r = b.add("Mul", [x, gi])
            out.append(r if share == 1.0 else b.add("Mul", [r, b.const(share)]))
        return out
    return emit


def _compile_fixed_normaliser(rule: LRPRule):
    """LayerNormalization y = (x - mean) / std * scale + shift with std held fixed: R_x = x (.) J^T s,
    s = R / stab(y), J^T s = c - mean(c) over the normalised axes, c = s * scale / std."""
    def emit(b, node, gy, want):
        out = [None] * len(node.input)
        if not want[0]:
            return out
        x, y = node.input[0], node.output[0]
        rank = rank_of(b, x, "LayerNormalization relevance")
        axes = list(range(attrs(node).get("axis", -1) % rank, rank))
        xc = b.add("Sub", [x, reduce_mean(b, x, axes)])
        var = reduce_mean(b, b.add("Mul", [xc, xc]), axes)
        std = b.add("Sqrt", [b.add("Add", [var, b.const(float(attrs(node).get("epsilon", 1e-5)))])])
        s = _stab_div(b, gy[0], y, rule.eps)
        c = b.add("Div", [b.add("Mul", [s, node.input[1]]), std])
        out[0] = b.add("Mul", [x, b.add("Sub", [c, reduce_mean(b, c, axes)])])
        return out
    return emit


def _compile_proportional(rule: LRPRule):
    def emit(b, node, gy, want):
        a = attrs(node)
        if a.get("ceil_mode", 0):
            raise GraphPassError(f"{node.name} (MaxPool): proportional rule does not support ceil_mode")
        kernel = list(a["kernel_shape"])
        x = node.input[0]
        xs, ys, strides, dil, begins, ends = vjp_rules._spatial(b, node, x, node.output[0], kernel)
        c = b.static_shape(x, "proportional pooling")[1]
        ones = b.const(np.ones([c, 1] + kernel, np.float32))
        z = b.add("Conv", [x, ones], strides=strides, dilations=dil, pads=list(begins) + list(ends),
                  group=c, kernel_shape=kernel)
        s = _stab_div(b, gy[0], z, rule.eps)
        pads, out_pad = vjp_rules._transpose_geometry(xs, ys, kernel, strides, dil, begins, ends)
        g = b.add("ConvTranspose", [s, ones], strides=strides, dilations=dil, pads=pads, output_padding=out_pad,
                  group=c, kernel_shape=kernel)
        return [b.add("Mul", [x, g])] + [None] * (len(node.output) - 1 + len(node.input) - 1)
    return emit


def _compile_unpool_overwrite(b, node, gy, want):
    """R_in = R of the last window (in row-major pooled order) whose argmax is this input, else 0: the pooled
    flat index of every window is scattered to its argmax with reduction max, then R is gathered there."""
    if attrs(node).get("storage_order", 0) != 0:
        raise GraphPassError(f"{node.name} (MaxPool): storage_order=1 is not supported")
    x, idx = node.input[0], vjp_rules.maxpool_indices(b, node)
    flat = b.const([-1], np.int64)
    r_flat = b.add("Reshape", [gy[0], flat])
    order = b.add("Range", [b.const(0, np.int64), b.add("Size", [r_flat]), b.const(1, np.int64)])
    size = b.add("Reshape", [b.add("Size", [x]), b.const([1], np.int64)])
    none = b.add("ConstantOfShape", [size], value=numpy_helper.from_array(np.full(1, -1, np.int64)))
    winner = b.add("ScatterElements", [none, b.add("Reshape", [idx, flat]), order], axis=0, reduction="max")
    picked = b.add("Gather", [r_flat, b.add("Max", [winner, b.const(0, np.int64)])], axis=0)
    routed = b.add("Where", [b.add("Less", [winner, b.const(0, np.int64)]), b.const(0.0), picked])
    return [b.add("Reshape", [routed, b.add("Shape", [x])])] + [None] * (len(node.input) - 1)


def _compile_gate(signal: int):
    def emit(b, node, gy, want):
        out = [None] * len(node.input)
        if signal >= 0 and want[signal]:
            out[signal] = b.unbroadcast(gy[0], node.input[signal], node.output[0])
        return out
    return emit


# identity: pointwise nonlinearities and normalisers hand their relevance to their input unchanged (LXT's rule
# for LayerNorm, GELU and friends; a kept BatchNorm only when fused as a layer's tail, see base_rule)
PASS_OPS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "PRelu",
            "Softplus", "Gelu", "Identity", "Dropout", "BatchNormalization", "Div", "Cast", "Neg", "Celu", "Mish",
            "Erf", "Abs", "Sqrt", "Pow", "Exp", "Log", "Reciprocal", "Softsign", "ThresholdedRelu",
            "LayerNormalization", "InstanceNormalization", "GroupNormalization", "LRN"}
# proportional (z / epsilon rule through the op's own gradient, R_in = x * J^T (R / stab(y))): sums, average
# pools, interpolating resizes, linear maps with one constant operand that are not a Conv/Gemm/MatMul layer, and
# the L1 / L2 norms (degree-1 homogeneous: R_i = |x_i| R / |x|_1, x_i^2 R / |x|_2^2 sum to R)
NORM_OPS = {"Add", "Sum", "Sub", "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum", "Mean", "Resize",
            "Upsample", "Einsum", "MatMul", "Gemm", "ReduceL1", "ReduceL2"}
# routed like the gradient (data movement: copies add up, dropped elements take their relevance with them)
STRUCTURAL_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Pad", "MaxPool",
                  "Identity", "Dropout", "Cast", "Gather", "Slice", "Split", "Expand", "Tile", "DepthToSpace",
                  "SpaceToDepth", "Where", "Mod", "Resize", "Upsample"}
# winner-take-all (the gradient's routing to the maximum): max pools and max / min reductions
WTA_OPS = {"MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "Max", "Min"}


def _nearest(node: onnx.NodeProto) -> bool:
    mode = attrs(node).get("mode", b"nearest")
    return (mode.decode() if isinstance(mode, bytes) else mode) == "nearest"


def _one_activation(node: onnx.NodeProto, analysis: LRPAnalysis) -> bool:
    return sum(1 for i in node.input if i in analysis.activations) == 1


def base_rule(node: onnx.NodeProto, analysis: LRPAnalysis, stabilizer: float = 1e-6) -> LRPRule | None:
    """The default for non-linear nodes (zennit's layer_map_base, LXT's identity for normalisers): activations,
    normalisers and kept BatchNorm pass, residual Add / average pools / interpolating resizes Norm, max pools and
    reductions winner-take-all, data movement routes; Mul gates hold the gate fixed, a Div by a statistic of its
    own numerator (a decomposed LayerNorm) holds the divisor fixed. Attention as AttnLRP: a MatMul or Mul of two
    activations takes the uniform rule, a Softmax its z-rule through its own Jacobian (the VJP of R / y, times
    the input). None = no rule."""
    op = node.op_type
    if node.name in analysis.tail_of:
        return Pass()
    if op in WTA_OPS:
        return WinnerTakeAll()
    if op in ("Resize", "Upsample"):
        return Gradient() if _nearest(node) else Norm(stabilizer)
    if op in STRUCTURAL_OPS:
        return Gradient()
    if op == "Mul":
        if node.name in analysis.gates:
            return Gate()
        return Uniform(stabilizer) if node.name in analysis.products else None
    if op == "Softmax":
        return Norm(stabilizer)
    if op == "Div":
        divisor_fixed = node.input[1] not in analysis.activations or node.name in analysis.normalising_divs
        return Pass() if len(node.input) > 1 and divisor_fixed else None
    if op in ("Einsum", "MatMul", "Gemm"):
        if _one_activation(node, analysis):
            return Norm(stabilizer)
        return Uniform(stabilizer) if node.name in analysis.products else None
    if op in NORM_OPS:
        return Norm(stabilizer)
    if op in PASS_OPS:
        return Pass()
    return None


NORMALISERS = {"LayerNormalization", "InstanceNormalization", "GroupNormalization", "LRN", "BatchNormalization"}


def rule_reason(rule: LRPRule, node: onnx.NodeProto, analysis: LRPAnalysis) -> str:
    """Why a node's rule moves relevance the way it does, in a few words (for the rule report)."""
    op = node.op_type
    if node.name in analysis.tail_of:
        return "affine tail: part of the layer before it"
    if rule.kind == "linear":
        return "linear layer: the composite's layer rule"
    if rule.kind == "pass":
        if op in NORMALISERS:
            return "identity: a normaliser passes its relevance on (attnlrp: fixed-normaliser, as LXT)"
        if op == "Div":
            return "identity: the divisor is held fixed"
        return "identity: pointwise nonlinearity"
    if rule.kind == "gradient":
        if rule.name == "wta":
            return "winner-take-all: to the maximum"
        if op in ("Resize", "Upsample"):
            return "nearest: routes like the gradient"
        return "routes like the gradient: data movement"
    if rule.kind == "norm":
        if op in ("Add", "Sum", "Sub", "Mean"):
            return "proportional to each summand"
        if op in ("Einsum", "MatMul", "Gemm"):
            return "proportional (z-rule): linear in its one activation"
        if op in ("ReduceL1", "ReduceL2"):
            return "proportional to each element's share of the norm"
        if op == "Softmax":
            return "z-rule through the Softmax's Jacobian (VJP x input), as AttnLRP"
        return "proportional (z-rule) through the op's linear map"
    if rule.kind == "gate":
        return "the gate is held fixed: all relevance to the signal"
    if rule.kind == "unpool-overwrite":
        return "winner-take-all, overlapping windows overwrite (max_unpool2d)"
    if rule.kind == "uniform":
        if rule.groups and analysis.products.get(node.name, -1) >= 0:
            return "CP-LRP: attention held fixed, all relevance to the values"
        return "uniform: half to each activation operand (AttnLRP)"
    if rule.kind == "fixed-normaliser":
        return "standard deviation held fixed, z-rule on centring and affine (AttnLRP)"
    return "proportional within each window"


def check_rule(rule: LRPRule, node: onnx.NodeProto, analysis: LRPAnalysis) -> None:
    op = node.op_type
    ok = {
        "linear": node.name in analysis.linear,
        "pass": op in PASS_OPS or node.name in analysis.tail_of,
        "norm": (op in NORM_OPS and (op not in ("Einsum", "MatMul", "Gemm") or _one_activation(node, analysis))
                 or (op == "BatchNormalization" and node.name not in analysis.tail_of) or op == "Softmax"),
        "uniform": node.name in analysis.products,
        "fixed-normaliser": op == "LayerNormalization",
        "gradient": op in _gradient_ops(),
        "proportional": op == "MaxPool",
        "unpool-overwrite": op == "MaxPool",
        "gate": op == "Mul" and node.name in analysis.gates,
    }[rule.kind]
    if not ok:
        raise GraphPassError(f"rule {rule.name!r} cannot apply to node {node.name} ({op})")


def _gradient_ops():
    return set(vjp_rules.PLAIN)


def compile_rules(rules: Mapping[str, LRPRule], analysis: LRPAnalysis, start: str | None = None) -> dict:
    """node name -> append_vjp rule function; `start` is the tensor the initial relevance is seeded at."""
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
            out[name] = vjp_rules.PLAIN[node.op_type]
        elif rule.kind == "proportional":
            out[name] = _compile_proportional(rule)
        elif rule.kind == "unpool-overwrite":
            out[name] = _compile_unpool_overwrite
        elif rule.kind == "gate":
            out[name] = _compile_gate(analysis.gates[name])
        elif rule.kind == "uniform":
            out[name] = _compile_uniform(rule, analysis)
        elif rule.kind == "fixed-normaliser":
            out[name] = _compile_fixed_normaliser(rule)
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
