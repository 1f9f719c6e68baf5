"""TSGB (Target-Selective Gradient Backprop, Cheng et al. 2022) as backward rules of append_vjp.

Rules follow the reference code's backward hooks (methods-spec section 3.1):
- TSGB-FC on the classifier layer: g_in = g (W+ + beta W-)^T with beta_j = P_j / |Q_j|, P_j = sum_i x_i w+_ij,
  Q_j = sum_i x_i w-_ij, so the target's rectified contribution sum_i x_i g_in_i is zero. A convolutional
  classifier (SqueezeNet's conv10) gets the same rule per output position.
- TSGB-Conv on every other conv: R(o) = sum_k g_k(o) y_k(o) (y with bias), spread over the receptive field in
  proportion to |x|: g_in_c(p) = sign(x_c(p)) sum_{o: p in RF(o)} R(o) / (Z(o) + 1e-10), Z = sum_{c, RF} |x|;
  channel sums stay within each group (depthwise convs redistribute per channel).
- "Output / input" for affine layers the conv does not contain (unfolded BatchNorm, a constant bias Add after
  a conv): g_in = g y / (x + 1e-10), which conserves g y.
- AveragePool with a local window (DenseNet transitions): g y shared uniformly over each window,
  g_in = share / (x + 1e-10). A pool with a 1x1 output is the export of a global / adaptive pool, which the
  reference leaves to the plain gradient.
- Everything else (ReLU, max-pool, residual Add, global pools, other dense layers, shape ops): plain gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ._graph import GraphPassError, attrs
from .lrp import analyze
from .vjp import append_vjp
from .vjp.rules import PLAIN, _spatial, _transpose_geometry, averagepool_rule

EPS = 1e-10


def _weight(b, node) -> np.ndarray:
    """The classifier's weight as (inputs, outputs) for Gemm/MatMul, as is (M, C/g, k...) for Conv."""
    w = b.value(node.input[1])
    if w is None:
        raise GraphPassError(f"{node.name} ({node.op_type}): TSGB-FC needs a constant weight")
    w = w.astype(np.float64)
    if node.op_type == "Gemm":
        a = attrs(node)
        if a.get("transA", 0):
            raise GraphPassError(f"{node.name} (Gemm): TSGB-FC does not support transA")
        return (w.T if a.get("transB", 0) else w) * a.get("alpha", 1.0)
    if node.op_type == "MatMul" and w.ndim != 2:
        raise GraphPassError(f"{node.name} (MatMul): TSGB-FC needs a 2-D weight")
    return w


def _conv_geometry(b, node, kernel):
    xs, ys, strides, dil, begins, ends = _spatial(b, node, node.input[0], node.output[0], kernel)
    pads, out_pad = _transpose_geometry(xs, ys, kernel, strides, dil, begins, ends)
    forward = dict(strides=strides, dilations=dil, pads=list(begins) + list(ends), kernel_shape=kernel)
    backward = dict(strides=strides, dilations=dil, pads=pads, output_padding=out_pad, kernel_shape=kernel)
    return forward, backward


def fc_rule(b, node, gy, want):
    """TSGB-FC: g_in = g W+^T + (g beta) W-^T, beta = P / |Q| (0 where Q = 0: no negative evidence to cancel)."""
    out = [None] * len(node.input)
    if not want[0]:
        return out
    x, g = node.input[0], gy[0]
    w = _weight(b, node)
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    if node.op_type == "Conv":
        kernel = list(attrs(node).get("kernel_shape", w.shape[2:]))
        fwd, bwd = _conv_geometry(b, node, kernel)
        group = attrs(node).get("group", 1)

        def forward(wc):
            return b.add("Conv", [x, b.const(wc)], group=group, **fwd)

        def backward(s, wc):
            return b.add("ConvTranspose", [s, b.const(wc)], group=group, **bwd)
    else:
        def forward(wc):
            return b.add("MatMul", [x, b.const(wc)])

        def backward(s, wc):
            return b.add("MatMul", [s, b.const(np.ascontiguousarray(wc.T))])
    p, q = forward(wp), forward(wn)
    q_abs = b.add("Abs", [q])
    has_q = b.add("Greater", [q_abs, b.const(0.0)])
    beta = b.add("Where", [has_q, b.add("Div", [p, b.add("Where", [has_q, q_abs, b.const(1.0)])]), b.const(0.0)])
    out[0] = b.add("Add", [backward(g, wp), backward(b.add("Mul", [g, beta]), wn)])
    return out


def conv_rule(b, node, gy, want, group_blind: bool = False):
    """TSGB-Conv: weight-free, |x|-proportional redistribution of the channel-summed g * y. group_blind: sum
    over all channels whatever the conv's groups, as the reference code's "slim" backward does (its full,
    commented-out version keeps the groups, as the default here).

    On a strided conv whose kernel is not a multiple of its stride this spread draws a grid, and that grid is
    the method's own: with 3x3 / stride 2 an input pixel lies in 2 x 2, 2 x 1, 1 x 2 or 1 x 1 receptive fields
    by the parity of its row and column, so it gets 4:2:2:1 shares (EfficientNet-Lite0's stem: phase means of
    |S| 1.77 : 0.88 : 0.90 : 0.45 on a photo). The authors' algorithm, written out in numpy, gives the same map
    value for value (tests/test_tsgb_checkerboard.py); it is neither our transposed conv nor up-sampling (the
    map is at input resolution) nor the display."""
    out = [None] * len(node.input)
    if not want[0]:
        return out
    x, y, g = node.input[0], node.output[0], gy[0]
    w_shape = b.static_shape(node.input[1], "TSGB-Conv")
    channels = b.static_shape(x, "TSGB-Conv")[1]
    if channels is None:
        raise GraphPassError(f"{node.name} (Conv): TSGB-Conv needs a static channel count")
    kernel = list(attrs(node).get("kernel_shape", w_shape[2:]))
    group = 1 if group_blind else attrs(node).get("group", 1)
    fwd, bwd = _conv_geometry(b, node, kernel)
    window = b.const(np.ones([group, channels // group] + kernel, np.float32))
    per_group = b.const(np.ones([group, w_shape[0] // group] + [1] * len(kernel), np.float32))
    relevance = b.add("Conv", [b.add("Mul", [g, y]), per_group], group=group)
    z = b.add("Conv", [b.add("Abs", [x]), window], group=group, **fwd)
    s = b.add("Div", [relevance, b.add("Add", [z, b.const(EPS)])])
    spread = b.add("ConvTranspose", [s, window], group=group, **bwd)
    out[0] = b.add("Mul", [b.add("Sign", [x]), spread])
    return out


def _ratio(b, g, y, x):
    return b.add("Div", [b.add("Mul", [g, y]), b.add("Add", [x, b.const(EPS)])])


def batchnorm_rule(b, node, gy, want):
    """LRP-BN: g_in = g BN(x) / (x + 1e-10)."""
    return [_ratio(b, gy[0], node.output[0], node.input[0]) if want[0] else None] + [None] * (len(node.input) - 1)


def bias_add_rule(b, node, gy, want):
    """A constant bias Add after a conv: output / input as for BatchNorm, so the conv sees g * (conv + bias)."""
    live = 0 if b.value(node.input[0]) is None else 1
    out = [None, None]
    if want[live]:
        out[live] = _ratio(b, gy[0], node.output[0], node.input[live])
    return out


def avgpool_rule(b, node, gy, want):
    ys = b.static_shape(node.output[0], "AveragePool backward")[2:]
    if all(d == 1 for d in ys):
        return averagepool_rule(b, node, gy, want)
    share = averagepool_rule(b, node, [b.add("Mul", [gy[0], node.output[0]])], want)[0]
    return [b.add("Div", [share, b.add("Add", [node.input[0], b.const(EPS)])])]


def group_blind_conv_rule(b, node, gy, want):
    return conv_rule(b, node, gy, want, group_blind=True)


TSGB = {**PLAIN, "Conv": conv_rule, "BatchNormalization": batchnorm_rule, "AveragePool": avgpool_rule}
# the reference code as it runs: grouped and depthwise convs redistribute over all channels
TSGB_REFERENCE = {**TSGB, "Conv": group_blind_conv_rule}


def classifier_layers(model, names: Iterable[str] | None = None) -> list[str]:
    """The nodes that get TSGB-FC: `names` if given (each a Gemm/MatMul/Conv with a constant weight), else the
    linear layers nearest the output (the final Linear; SqueezeNet's final conv)."""
    a = analyze(model)
    if names is None:
        return sorted(a.last)
    names = list(names)
    bad = [n for n in names if n not in a.linear]
    if bad:
        raise GraphPassError(f"{', '.join(bad)}: not a Conv/Gemm/MatMul node with a constant weight")
    return names


def append_tsgb(model, output: str, wrt: list[str], *, seed: str | None, classifier: Iterable[str] | None = None,
                prefix: str = "tsgb/", group_blind: bool = False):
    """append_vjp with the TSGB rules: outputs grad_name(t) for t in `wrt` hold the modified gradient g-hat.
    group_blind: TSGB_REFERENCE's conv rule (the reference code's slim backward)."""
    a = analyze(model)
    node_rules = {name: fc_rule for name in classifier_layers(model, classifier)}
    for tail, linear in a.tail_of.items():
        if a.nodes[tail].op_type == "Add" and a.nodes[linear].op_type == "Conv" and linear not in node_rules:
            node_rules[tail] = bias_add_rule
    return append_vjp(model, output, wrt, seed=seed, rules=TSGB_REFERENCE if group_blind else TSGB,
                      node_rules=node_rules, prefix=prefix)


__all__ = ["TSGB", "TSGB_REFERENCE", "group_blind_conv_rule", "append_tsgb", "classifier_layers", "fc_rule", "conv_rule", "batchnorm_rule", "bias_add_rule",
           "avgpool_rule", "EPS"]
