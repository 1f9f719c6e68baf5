"""Backward rules of the normalisers: LayerNormalization, InstanceNormalization, GroupNormalization and LRN.
The statistics are recomputed from the input in the backward graph (a few reductions), rather than asking the
forward node for its optional outputs."""

from __future__ import annotations

import numpy as np

from .._graph import attrs
from ._emit import rank_of, reduce_mean, reduce_sum, unsupported


def normalize_backward(b, x: str, axes: list[int], eps: float, gh: str) -> tuple[str, str]:
    """For xhat = (x - mean) / sqrt(var + eps) over `axes` and gh = dL/dxhat: (dL/dx, xhat)."""
    mu = reduce_mean(b, x, axes)
    xc = b.add("Sub", [x, mu])
    var = reduce_mean(b, b.add("Mul", [xc, xc]), axes)
    inv = b.add("Reciprocal", [b.add("Sqrt", [b.add("Add", [var, b.const(float(eps))])])])
    xhat = b.add("Mul", [xc, inv])
    m1 = reduce_mean(b, gh, axes)
    m2 = reduce_mean(b, b.add("Mul", [gh, xhat]), axes)
    centred = b.add("Sub", [b.add("Sub", [gh, m1]), b.add("Mul", [xhat, m2])])
    return b.add("Mul", [centred, inv]), xhat


def _no_statistics_gradient(b, gy):
    if any(g is not None for g in gy[1:]):
        unsupported(b, "gradients through the Mean / InvStdDev outputs are not supported")


def layer_norm_rule(b, node, gy, want):
    _no_statistics_gradient(b, gy)
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    rank = rank_of(b, x, "LayerNormalization backward")
    axis = attrs(node).get("axis", -1) % rank
    g, y = gy[0], node.output[0]
    gx, xhat = normalize_backward(b, x, list(range(axis, rank)), attrs(node).get("epsilon", 1e-5),
                                  b.add("Mul", [g, scale]))
    out = [gx if want[0] else None, None, None][:len(node.input)]
    if want[1]:
        out[1] = b.unbroadcast(b.add("Mul", [g, xhat]), scale, y)
    if bias is not None and want[2]:
        out[2] = b.unbroadcast(g, bias, y)
    return out


def _per_channel(b, v: str, rank: int) -> str:
    """A (C,) vector shaped to broadcast along axis 1 of a rank-`rank` tensor."""
    shape = [-1] + [1] * (rank - 2)
    value = b.value(v)
    if value is not None:
        return b.const(value.astype(np.float32).reshape(shape))
    return b.add("Reshape", [v, b.const(shape, np.int64)])


def instance_norm_rule(b, node, gy, want):
    x, scale, bias = node.input
    rank = rank_of(b, x, "InstanceNormalization backward")
    g = gy[0]
    gx, xhat = normalize_backward(b, x, list(range(2, rank)), attrs(node).get("epsilon", 1e-5),
                                  b.add("Mul", [g, _per_channel(b, scale, rank)]))
    others = [0] + list(range(2, rank))
    gs = reduce_sum(b, b.add("Mul", [g, xhat]), others, keepdims=0) if want[1] else None
    gb = reduce_sum(b, g, others, keepdims=0) if want[2] else None
    return [gx if want[0] else None, gs, gb]


def group_norm_rule(b, node, gy, want):
    """GroupNormalization-21 (one scale per channel; the per-group opset 18 form is deprecated and refused by
    the ONNX checker): normalise each of the num_groups channel groups over its channels and spatial axes."""
    if any(want[1:]):
        unsupported(b, "gradients of GroupNormalization's scale and bias are not supported")
    x, scale = node.input[0], node.input[1]
    rank = rank_of(b, x, "GroupNormalization backward")
    groups = int(attrs(node)["num_groups"])
    grouped = b.const([0, groups, -1], np.int64)
    gh = b.add("Reshape", [b.add("Mul", [gy[0], _per_channel(b, scale, rank)]), grouped])
    gx, _ = normalize_backward(b, b.add("Reshape", [x, grouped]), [2], attrs(node).get("epsilon", 1e-5), gh)
    return [b.add("Reshape", [gx, b.add("Shape", [x])]), None, None]


def _channel_window_sum(b, t: str, rank: int, size: int, before: int, after: int) -> str:
    """out[:, c] = sum of t[:, c - before .. c + after] (zero outside), as a Conv over an added unit axis."""
    kernel = [size] + [1] * (rank - 2)
    ones = b.const(np.ones([1, 1] + kernel, np.float32))
    lifted = b.add("Unsqueeze", [t, b.const([1], np.int64)])
    pads = [before] + [0] * (rank - 2) + [after] + [0] * (rank - 2)
    summed = b.add("Conv", [lifted, ones], kernel_shape=kernel, pads=pads)
    return b.add("Squeeze", [summed, b.const([1], np.int64)])


def lrn_rule(b, node, gy, want):
    """y = x d^-beta, d = bias + alpha/size * sum over the channel window of x^2 (window [c - floor((size-1)/2),
    c + ceil((size-1)/2)]); dL/dx = g d^-beta - 2 alpha beta / size * x * window^T(g x d^(-beta-1))."""
    a = attrs(node)
    size, alpha, beta, bias = int(a["size"]), a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    x, g = node.input[0], gy[0]
    rank = rank_of(b, x, "LRN backward")
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    d = b.add("Add", [b.add("Mul", [_channel_window_sum(b, b.add("Mul", [x, x]), rank, size, lo, hi),
                                    b.const(alpha / size)]), b.const(bias)])
    d_beta = b.add("Pow", [d, b.const(-beta)])
    inner = b.add("Div", [b.add("Mul", [b.add("Mul", [g, x]), d_beta]), d])
    back = _channel_window_sum(b, inner, rank, size, hi, lo)
    spread = b.add("Mul", [b.add("Mul", [x, back]), b.const(-2.0 * alpha * beta / size)])
    return [b.add("Add", [b.add("Mul", [g, d_beta]), spread])]


RULES = {"LayerNormalization": layer_norm_rule, "InstanceNormalization": instance_norm_rule,
         "GroupNormalization": group_norm_rule, "LRN": lrn_rule}
