"""Backward rules, one per op type: each emits the ONNX nodes of its vector-Jacobian product.

A rule returns one gradient name (or None) per node input, and only needs to produce those flagged in
`want`. Rules for weights (Conv W, Gemm B as constants) are not produced: explanations differentiate
activations. `PLAIN` holds the exact gradients; `GUIDED` swaps the ReLU rule for guided backprop's.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from typing import TYPE_CHECKING

from .._graph import attrs
from . import einsum, movement, normalization, pointwise
from ._emit import apply_along_axis, keep_reduced, reduce_sum
from ._emit import unsupported as _unsupported

if TYPE_CHECKING:  # rules receive the builder; they never import it
    from .builder import VJPBuilder  # noqa: F401


# --- elementwise arithmetic --------------------------------------------------------------------------------

def add_rule(b, node, gy, want):
    g = gy[0]
    return [b.unbroadcast(g, x, node.output[0]) if w else None for x, w in zip(node.input, want)]


def sub_rule(b, node, gy, want):
    g = gy[0]
    ga = b.unbroadcast(g, node.input[0], node.output[0]) if want[0] else None
    gb = b.unbroadcast(b.add("Neg", [g]), node.input[1], node.output[0]) if want[1] else None
    return [ga, gb]


def mul_rule(b, node, gy, want):
    g = gy[0]
    a, c = node.input
    ga = b.unbroadcast(b.add("Mul", [g, c]), a, node.output[0]) if want[0] else None
    gc = b.unbroadcast(b.add("Mul", [g, a]), c, node.output[0]) if want[1] else None
    return [ga, gc]


def div_rule(b, node, gy, want):
    g = gy[0]
    a, c = node.input
    ga = b.unbroadcast(b.add("Div", [g, c]), a, node.output[0]) if want[0] else None
    gc = None
    if want[1]:  # d(a/c)/dc = -y/c
        gc = b.unbroadcast(b.add("Neg", [b.add("Mul", [g, b.add("Div", [node.output[0], c])])]), c, node.output[0])
    return [ga, gc]


def sum_rule(b, node, gy, want):
    return [b.unbroadcast(gy[0], x, node.output[0]) if w else None for x, w in zip(node.input, want)]


def neg_rule(b, node, gy, want):
    return [b.add("Neg", [gy[0]])]


# --- activations -------------------------------------------------------------------------------------------

def _where(b, cond, g):
    return b.add("Where", [cond, g, b.const(0.0)])


def relu_rule(b, node, gy, want):
    return [_where(b, b.add("Greater", [node.input[0], b.const(0.0)]), gy[0])]


def guided_relu_rule(b, node, gy, want):
    """Guided backprop: pass the gradient only where the input is positive and the gradient is positive."""
    return [_where(b, b.add("Greater", [node.input[0], b.const(0.0)]), b.add("Relu", [gy[0]]))]


def guided_clip_rule(b, node, gy, want):
    """Guided backprop through ReLU6-style Clip: the Clip mask, and only positive gradients pass."""
    return clip_rule(b, node, [b.add("Relu", [gy[0]])], want)


def leaky_relu_rule(b, node, gy, want):
    alpha = attrs(node).get("alpha", 0.01)
    g = gy[0]
    return [b.add("Where", [b.add("Greater", [node.input[0], b.const(0.0)]), g, b.add("Mul", [g, b.const(alpha)])])]


def clip_rule(b, node, gy, want):
    """Zero outside (min, max), open interval, as torch's hardtanh/relu6 backward."""
    x = node.input[0]
    conds = []
    if len(node.input) > 1 and node.input[1]:
        conds.append(b.add("Greater", [x, node.input[1]]))
    if len(node.input) > 2 and node.input[2]:
        conds.append(b.add("Less", [x, node.input[2]]))
    if not conds:
        return [gy[0], None, None]
    cond = conds[0] if len(conds) == 1 else b.add("And", conds)
    return [_where(b, cond, gy[0]), None, None]


def sigmoid_rule(b, node, gy, want):
    y = node.output[0]
    return [b.add("Mul", [gy[0], b.add("Mul", [y, b.add("Sub", [b.const(1.0), y])])])]


def tanh_rule(b, node, gy, want):
    y = node.output[0]
    return [b.add("Mul", [gy[0], b.add("Sub", [b.const(1.0), b.add("Mul", [y, y])])])]


def hard_sigmoid_rule(b, node, gy, want):
    a = attrs(node)
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    z = b.add("Add", [b.add("Mul", [node.input[0], b.const(alpha)]), b.const(beta)])
    cond = b.add("And", [b.add("Greater", [z, b.const(0.0)]), b.add("Less", [z, b.const(1.0)])])
    return [_where(b, cond, b.add("Mul", [gy[0], b.const(alpha)]))]


def hard_swish_rule(b, node, gy, want):
    x = node.input[0]
    # y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, 1 above 3, (2x + 3)/6 between
    mid = b.add("Add", [b.add("Mul", [x, b.const(1 / 3)]), b.const(0.5)])
    slope = b.add("Where", [b.add("Less", [x, b.const(-3.0)]), b.const(0.0),
                            b.add("Where", [b.add("Greater", [x, b.const(3.0)]), b.const(1.0), mid])])
    return [b.add("Mul", [gy[0], slope])]


def exp_rule(b, node, gy, want):
    return [b.add("Mul", [gy[0], node.output[0]])]


def softmax_rule(b, node, gy, want):
    axis = attrs(node).get("axis", -1)
    y, g = node.output[0], gy[0]
    dot = b.add("ReduceSum", [b.add("Mul", [g, y]), b.const([axis], np.int64)], keepdims=1)
    return [b.add("Mul", [y, b.add("Sub", [g, dot])])]


def log_softmax_rule(b, node, gy, want):
    axis = attrs(node).get("axis", -1)
    g = gy[0]
    total = b.add("ReduceSum", [g, b.const([axis], np.int64)], keepdims=1)
    return [b.add("Sub", [g, b.add("Mul", [b.add("Exp", [node.output[0]]), total])])]


def passthrough_rule(b, node, gy, want):
    return [gy[0]] + [None] * (len(node.input) - 1)


# --- linear layers -----------------------------------------------------------------------------------------

def _spatial(b, node, x, y, kernel):
    """Per spatial axis: (stride, dilation, pad_begin, pad_end) with auto_pad resolved from static shapes."""
    a = attrs(node)
    n = len(kernel)
    xs = b.static_shape(x, "the backward pass")[2:]
    ys = b.static_shape(y, "the backward pass")[2:]
    if any(d is None for d in list(xs) + list(ys)):
        _unsupported(b, "spatial sizes must be static (only the batch may be dynamic)")
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = list(a.get("pads", [0] * 2 * n))
        begins, ends = pads[:n], pads[n:]
    elif auto == "VALID":
        begins, ends = [0] * n, [0] * n
    else:
        begins, ends = [], []
        for i in range(n):
            k_eff = (kernel[i] - 1) * dil[i] + 1
            total = max((ys[i] - 1) * strides[i] + k_eff - xs[i], 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
    return xs, ys, strides, dil, begins, ends


def _transpose_geometry(xs, ys, kernel, strides, dil, begins, ends):
    """Pads and output_padding for a ConvTranspose that maps y-space back exactly onto x-space.

    Windows that ran past the padded input (ceil_mode pooling) make the natural output too long; extra end
    padding crops that, since output_padding cannot be negative.
    """
    ends = list(ends)
    out_pad = []
    for i in range(len(kernel)):
        k_eff = (kernel[i] - 1) * dil[i] + 1
        natural = strides[i] * (ys[i] - 1) + k_eff - begins[i] - ends[i]
        extra = xs[i] - natural
        if extra < 0:
            ends[i] -= extra
            extra = 0
        out_pad.append(extra)
    return list(begins) + ends, out_pad


def conv_rule(b, node, gy, want):
    if any(want[1:]):
        _unsupported(b, "gradients of weights or biases are not supported (differentiate activations)")
    x, w = node.input[0], node.input[1]
    wshape = b.static_shape(w, "the backward pass")
    kernel = list(attrs(node).get("kernel_shape", wshape[2:]))
    xs, ys, strides, dil, begins, ends = _spatial(b, node, x, node.output[0], kernel)
    pads, out_pad = _transpose_geometry(xs, ys, kernel, strides, dil, begins, ends)
    # ConvTranspose's weight layout (C_in_of_transpose, M/group, k...) is exactly Conv's (M, C/group, k...)
    gx = b.add("ConvTranspose", [gy[0], w], strides=strides, dilations=dil, pads=pads, output_padding=out_pad,
               group=attrs(node).get("group", 1), kernel_shape=kernel)
    return [gx] + [None] * (len(node.input) - 1)


def conv_transpose_adjoint(b, node, s: str, w: str) -> str:
    """ConvTranspose is the adjoint of Conv, so its transpose applied to `s` (shaped like the node's output) is a
    Conv with the weight `w` in the node's geometry: the begin pads shift as in the forward; the end is padded
    (or cropped) so the result has the input's size."""
    a = attrs(node)
    x = node.input[0]
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID", "") or "output_shape" in a:
        _unsupported(b, "auto_pad SAME_* and output_shape are not supported (explicit pads only)")
    kernel = list(a.get("kernel_shape", b.static_shape(node.input[1], "ConvTranspose backward")[2:]))
    n = len(kernel)
    xs = b.static_shape(x, "ConvTranspose backward")[2:]
    ys = b.static_shape(node.output[0], "ConvTranspose backward")[2:]
    if any(d is None for d in list(xs) + list(ys)):
        _unsupported(b, "spatial sizes must be static (only the batch may be dynamic)")
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    pads = [0] * (2 * n) if auto == "VALID" else list(a.get("pads", [0] * (2 * n)))
    ends, crop = [], []
    for i in range(n):
        k_eff = (kernel[i] - 1) * dil[i] + 1
        need = (xs[i] - 1) * strides[i] + k_eff - ys[i] - pads[i]
        ends.append(max(need, 0))
        crop.append(need < 0)
    gx = b.add("Conv", [s, w], strides=strides, dilations=dil, pads=pads[:n] + ends, group=a.get("group", 1),
               kernel_shape=kernel)
    if any(crop):
        axes = [2 + i for i in range(n) if crop[i]]
        gx = b.add("Slice", [gx, b.const([0] * len(axes), np.int64),
                             b.const([xs[i] for i in range(n) if crop[i]], np.int64), b.const(axes, np.int64)])
    return gx


def conv_transpose_rule(b, node, gy, want):
    if any(want[1:]):
        _unsupported(b, "gradients of weights or biases are not supported (differentiate activations)")
    return [conv_transpose_adjoint(b, node, gy[0], node.input[1])] + [None] * (len(node.input) - 1)


def gemm_rule(b, node, gy, want):
    a = attrs(node)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    ta, tb = a.get("transA", 0), a.get("transB", 0)
    A, B = node.input[0], node.input[1]
    g = gy[0]
    out = [None] * len(node.input)
    if want[0]:  # dA' = alpha g B'^T
        if ta:
            out[0] = b.add("Gemm", [B, g], alpha=alpha, transA=tb, transB=1)
        else:
            out[0] = b.add("Gemm", [g, B], alpha=alpha, transB=1 - tb)
    if want[1]:  # dB' = alpha A'^T g
        if tb:
            out[1] = b.add("Gemm", [g, A], alpha=alpha, transA=1, transB=ta)
        else:
            out[1] = b.add("Gemm", [A, g], alpha=alpha, transA=1 - ta)
    if len(want) > 2 and want[2]:
        out[2] = b.unbroadcast(b.add("Mul", [g, b.const(beta)]), node.input[2], node.output[0])
    return out


def _swap_last_two(b, t):
    rank = len(b.static_shape(t, "MatMul backward"))
    if rank < 2:
        _unsupported(b, "1-D MatMul operands are not supported")
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.add("Transpose", [t], perm=perm)


def matmul_rule(b, node, gy, want):
    A, B = node.input
    g, y = gy[0], node.output[0]
    ga = b.unbroadcast(b.add("MatMul", [g, _swap_last_two(b, B)]), A, y) if want[0] else None
    gb = b.unbroadcast(b.add("MatMul", [_swap_last_two(b, A), g]), B, y) if want[1] else None
    return [ga, gb]


def batchnorm_rule(b, node, gy, want):
    """Inference-mode BN is per-channel affine: the gradient scales by gamma / sqrt(var + eps)."""
    if any(want[1:]):
        _unsupported(b, "gradients of BatchNormalization parameters are not supported")
    eps = attrs(node).get("epsilon", 1e-5)
    gamma, var = b.value(node.input[1]), b.value(node.input[4])
    rank = len(b.static_shape(node.input[0], "BatchNormalization backward"))
    bshape = [1, -1] + [1] * (rank - 2)
    if gamma is not None and var is not None:
        scale = b.const((gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)).reshape(bshape))
    else:
        s = b.add("Div", [node.input[1], b.add("Sqrt", [b.add("Add", [node.input[4], b.const(eps)])])])
        scale = b.add("Reshape", [s, b.const(bshape, np.int64)])
    return [b.add("Mul", [gy[0], scale])] + [None] * 4


# --- pooling -----------------------------------------------------------------------------------------------

def maxpool_indices(b, node) -> str:
    """The MaxPool's argmax output (flat input indices), added to the node where the export left it out."""
    if len(node.output) < 2 or not node.output[1]:
        idx = b.fresh("argmax")
        if len(node.output) < 2:
            node.output.append(idx)
        else:
            node.output[1] = idx
    return node.output[1]


def maxpool_rule(b, node, gy, want):
    """Route each output's gradient to its argmax; overlapping windows accumulate via ScatterElements(add)."""
    idx = maxpool_indices(b, node)
    if attrs(node).get("storage_order", 0) != 0:
        _unsupported(b, "storage_order=1 is not supported")
    x = node.input[0]
    a = attrs(node)
    kernel = list(a["kernel_shape"])
    dil = list(a.get("dilations", [1] * len(kernel)))
    strides = list(a.get("strides", [1] * len(kernel)))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if (all((k - 1) * d + 1 <= s for k, d, s in zip(kernel, dil, strides)) and not a.get("ceil_mode", 0)
            and auto_pad in ("NOTSET", "VALID")):
        # windows do not overlap, so no input is the argmax of two outputs: MaxUnpool places each gradient at
        # its argmax directly (about 5x faster than zero-filling and a ScatterElements(add) in onnxruntime);
        # the pads only keep onnxruntime's minimum-size check in line with the pool's geometry
        pads = list(a.get("pads", [0] * 2 * len(kernel)))
        return [b.add("MaxUnpool", [gy[0], idx, b.add("Shape", [x])], kernel_shape=kernel, strides=strides,
                      pads=pads)]
    flat_shape = b.const([-1], np.int64)
    size = b.add("Reshape", [b.add("Size", [x]), b.const([1], np.int64)])
    zeros = b.add("ConstantOfShape", [size], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    scattered = b.add("ScatterElements", [zeros, b.add("Reshape", [idx, flat_shape]),
                                          b.add("Reshape", [gy[0], flat_shape])], axis=0, reduction="add")
    return [b.add("Reshape", [scattered, b.add("Shape", [x])])]


def _pool_divisor(xs, ys, kernel, strides, begins, ends, include_pad):
    """How many elements each output window averaged over (per ONNX: clipped to the input, or to the padded
    input when count_include_pad)."""
    per_axis = []
    for i in range(len(kernel)):
        lo_bound = -begins[i] if include_pad else 0
        hi_bound = xs[i] + ends[i] if include_pad else xs[i]
        starts = np.arange(ys[i]) * strides[i] - begins[i]
        lo = np.maximum(starts, lo_bound)
        hi = np.minimum(starts + kernel[i], hi_bound)
        per_axis.append(np.maximum(hi - lo, 1))
    div = per_axis[0].astype(np.float64)
    for c in per_axis[1:]:
        div = np.multiply.outer(div, c)
    return div


def averagepool_rule(b, node, gy, want):
    a = attrs(node)
    kernel = list(a["kernel_shape"])
    x = node.input[0]
    xs, ys, strides, dil, begins, ends = _spatial(b, node, x, node.output[0], kernel)
    if any(d != 1 for d in dil):
        _unsupported(b, "dilated AveragePool is not supported")
    channels = b.static_shape(x, "AveragePool backward")[1]
    if channels is None:
        _unsupported(b, "the channel count must be static")
    div = _pool_divisor(xs, ys, kernel, strides, begins, ends, a.get("count_include_pad", 0))
    scaled = b.add("Mul", [gy[0], b.const((1.0 / div)[None, None])])
    pads, out_pad = _transpose_geometry(xs, ys, kernel, strides, dil, begins, ends)
    ones = b.const(np.ones([channels, 1] + kernel))
    gx = b.add("ConvTranspose", [scaled, ones], strides=strides, pads=pads, output_padding=out_pad,
               group=channels, kernel_shape=kernel)
    return [gx]


def global_avgpool_rule(b, node, gy, want):
    xs = b.static_shape(node.input[0], "GlobalAveragePool backward")[2:]
    if any(d is None for d in xs):
        _unsupported(b, "spatial sizes must be static")
    scaled = b.add("Mul", [gy[0], b.const(1.0 / float(np.prod(xs)))])
    return [b.add("Expand", [scaled, b.add("Shape", [node.input[0]])])]


def _reduce_axes(b, node):
    a = attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = b.value(node.input[1])
        if value is None:
            _unsupported(b, "reduction axes must be constant")
        axes = value.tolist()
    rank = len(b.static_shape(node.input[0], "reduction backward"))
    if axes is None or len(axes) == 0:
        if a.get("noop_with_empty_axes", 0):
            return None, rank
        axes = list(range(rank))
    return sorted(int(ax) % rank for ax in axes), rank


def _reduce_rule(b, node, gy, mean):
    axes, rank = _reduce_axes(b, node)
    g = gy[0]
    if axes is None:
        return [g, None]
    if mean:
        xs = b.static_shape(node.input[0], "ReduceMean backward")
        count = [xs[ax] for ax in axes]
        if any(c is None for c in count):
            _unsupported(b, "reduced axes must be static")
        g = b.add("Mul", [g, b.const(1.0 / float(np.prod(count)))])
    if not attrs(node).get("keepdims", 1):
        g = b.add("Unsqueeze", [g, b.const(axes, np.int64)])
    return [b.add("Expand", [g, b.add("Shape", [node.input[0]])]), None]


def reduce_mean_rule(b, node, gy, want):
    return _reduce_rule(b, node, gy, mean=True)


def reduce_sum_rule(b, node, gy, want):
    return _reduce_rule(b, node, gy, mean=False)


def _extreme_backward(b, node, gy, axes):
    """ReduceMax/Min, GlobalMaxPool: the gradient goes to the elements equal to the result, split evenly among
    ties (autograd's amax/amin convention)."""
    x = node.input[0]
    y, g = keep_reduced(b, node, node.output[0], axes), keep_reduced(b, node, gy[0], axes)
    mask = b.add("Equal", [x, y])
    count = reduce_sum(b, b.add("Cast", [mask], to=1), axes)
    return b.add("Where", [mask, b.add("Div", [g, count]), b.const(0.0)])


def reduce_extreme_rule(b, node, gy, want):
    axes, _ = _reduce_axes(b, node)
    if axes is None:
        return [gy[0], None]
    return [_extreme_backward(b, node, gy, axes), None]


def global_maxpool_rule(b, node, gy, want):
    rank = len(b.static_shape(node.input[0], "GlobalMaxPool backward"))
    return [_extreme_backward(b, node, gy, list(range(2, rank)))]


def _reduce_norm_rule(kind: str):
    def rule(b, node, gy, want):
        axes, _ = _reduce_axes(b, node)
        x = node.input[0]
        if axes is None:  # noop_with_empty_axes: the output is the input
            return [gy[0], None]
        g, y = keep_reduced(b, node, gy[0], axes), keep_reduced(b, node, node.output[0], axes)
        if kind == "L1":
            gx = b.add("Mul", [g, b.add("Sign", [x])])
        elif kind == "L2":  # x / |x|, 0 where the norm is 0 (autograd's subgradient)
            zero = b.add("Equal", [y, b.const(0.0)])
            safe = b.add("Where", [zero, b.const(1.0), y])
            gx = b.add("Where", [zero, b.const(0.0), b.add("Div", [b.add("Mul", [g, x]), safe])])
        elif kind == "SumSquare":
            gx = b.add("Mul", [b.add("Mul", [g, x]), b.const(2.0)])
        else:  # LogSumExp
            gx = b.add("Mul", [g, b.add("Exp", [b.add("Sub", [x, y])])])
        return [gx, None]
    return rule


# --- structure ---------------------------------------------------------------------------------------------

def reshape_like_input_rule(b, node, gy, want):
    """Flatten/Reshape/Squeeze/Unsqueeze only move elements: reshape the gradient back."""
    return [b.add("Reshape", [gy[0], b.add("Shape", [node.input[0]])])] + [None] * (len(node.input) - 1)


def transpose_rule(b, node, gy, want):
    rank = len(b.static_shape(node.input[0], "Transpose backward"))
    perm = list(attrs(node).get("perm", list(reversed(range(rank)))))
    inverse = list(np.argsort(perm))
    return [b.add("Transpose", [gy[0]], perm=[int(p) for p in inverse])]


def concat_rule(b, node, gy, want):
    """Split the gradient back into the concatenated parts. Sizes along the axis are constants when shape
    inference knows them, else read at run time (a ViT's class token is Expanded to the run-time batch, so
    shape inference loses its sizes)."""
    axis = attrs(node)["axis"]
    sizes = []
    for x in node.input:
        shape = b.static_shape(x, "Concat backward")
        sizes.append(shape[axis % len(shape)])
    if all(s is not None for s in sizes):
        split = b.const(sizes, np.int64)
    else:
        rank = len(b.static_shape(node.input[0], "Concat backward"))
        ax = axis % rank
        split = b.add("Concat", [b.add("Shape", [x], start=ax, end=ax + 1) for x in node.input], axis=0)
    parts = b.add("Split", [gy[0], split], n_out=len(sizes), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p if w else None for p, w in zip(parts, want)]


def _pad_source(o: int, begin: int, dim: int, mode: str) -> int | None:
    """The input position output position `o` of a padded axis copies (None: the constant)."""
    i = o - begin
    if 0 <= i < dim:
        return i
    if mode == "constant":
        return None
    if mode == "edge":
        return min(max(i, 0), dim - 1)
    if mode == "wrap":
        return i % dim
    period = 2 * (dim - 1)  # reflect: mirror without repeating the edge
    i = i % period if period else 0
    return period - i if i >= dim else i


def pad_rule(b, node, gy, want):
    """Constant padding (the usual case): a Slice of the gradient. Cropping (negative pads) and the
    reflect / edge / wrap modes: per padded axis a constant 0/1 matrix (copies add up), static sizes needed."""
    a = attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = b.value(node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(a.get("pads"))
    if pads is None:
        _unsupported(b, "pads must be constant")
    pads = [int(p) for p in np.ravel(pads)]
    n = len(pads) // 2
    shape = b.static_shape(node.input[0], "Pad backward")
    rank = len(shape)
    if len(node.input) > 3 and node.input[3]:
        axes_value = b.value(node.input[3])
        if axes_value is None:
            _unsupported(b, "pad axes must be constant")
        axes = [int(v) % rank for v in np.ravel(axes_value)]
    else:
        axes = list(range(n))
    if mode == "constant" and all(p >= 0 for p in pads):
        big = np.iinfo(np.int64).max
        starts = pads[:n]
        ends = [-p if p else big for p in pads[n:]]
        gx = b.add("Slice", [gy[0], b.const(starts, np.int64), b.const(ends, np.int64), b.const(axes, np.int64)])
        return [gx] + [None] * (len(node.input) - 1)
    if mode not in ("constant", "edge", "reflect", "wrap"):
        _unsupported(b, f"Pad mode {mode!r} has no backward rule")
    g = gy[0]
    for k, ax in enumerate(axes):
        begin, end = pads[k], pads[n + k]
        if not begin and not end:
            continue
        dim = shape[ax]
        if dim is None:
            _unsupported(b, f"padded axis {ax} must be static for mode {mode!r} or negative pads")
        matrix = np.zeros((dim + begin + end, dim), np.float32)
        for o in range(dim + begin + end):
            src = _pad_source(o, begin, dim, mode)
            if src is not None:
                matrix[o, src] += 1.0
        g = apply_along_axis(b, g, ax, rank, matrix)
    return [g] + [None] * (len(node.input) - 1)


def cast_rule(b, node, gy, want):
    info = b.infos.get(node.input[0])
    if info is None or not info.is_float:
        return [None]
    return [b.add("Cast", [gy[0]], to=info.elem_type)]


PLAIN = {
    "Add": add_rule, "Sub": sub_rule, "Mul": mul_rule, "Div": div_rule, "Sum": sum_rule, "Neg": neg_rule,
    "Relu": relu_rule, "LeakyRelu": leaky_relu_rule, "Clip": clip_rule, "Sigmoid": sigmoid_rule,
    "Tanh": tanh_rule, "HardSigmoid": hard_sigmoid_rule, "HardSwish": hard_swish_rule, "Exp": exp_rule,
    "Softmax": softmax_rule, "LogSoftmax": log_softmax_rule,
    "Identity": passthrough_rule, "Dropout": passthrough_rule, "Cast": cast_rule,
    "Conv": conv_rule, "Gemm": gemm_rule, "MatMul": matmul_rule, "BatchNormalization": batchnorm_rule,
    "MaxPool": maxpool_rule, "AveragePool": averagepool_rule, "GlobalAveragePool": global_avgpool_rule,
    "ReduceMean": reduce_mean_rule, "ReduceSum": reduce_sum_rule,
    "Flatten": reshape_like_input_rule, "Reshape": reshape_like_input_rule, "Squeeze": reshape_like_input_rule,
    "Unsqueeze": reshape_like_input_rule, "Transpose": transpose_rule, "Concat": concat_rule, "Pad": pad_rule,
    "ConvTranspose": conv_transpose_rule, "ReduceMax": reduce_extreme_rule, "ReduceMin": reduce_extreme_rule,
    "GlobalMaxPool": global_maxpool_rule, "ReduceL1": _reduce_norm_rule("L1"), "ReduceL2": _reduce_norm_rule("L2"),
    "ReduceSumSquare": _reduce_norm_rule("SumSquare"), "ReduceLogSumExp": _reduce_norm_rule("LogSumExp"),
    **pointwise.RULES, **normalization.RULES, **movement.RULES, **einsum.RULES,
}

GUIDED = {**PLAIN, "Relu": guided_relu_rule, "Clip": guided_clip_rule}
