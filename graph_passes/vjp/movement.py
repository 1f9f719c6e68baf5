"""Backward rules of data movement: Gather (on data), Slice, Split, Expand, Tile, DepthToSpace / SpaceToDepth and
Resize / Upsample. Each forward op is linear in its data input, so its gradient routes (or, for an
interpolating Resize, spreads) the incoming gradient back to where the values came from; copies add up."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .._graph import attrs
from ._emit import apply_along_axis, const_ints, rank_of, unsupported

_BIG = np.iinfo(np.int64).max


def gather_rule(b, node, gy, want):
    """Scatter-add into zeros along `axis` (repeated indices accumulate): ScatterND on the data with `axis`
    moved to the front, so any index shape and any rank work with one node."""
    data, indices = node.input
    shape = b.static_shape(data, "Gather backward")
    rank = len(shape)
    axis = attrs(node).get("axis", 0) % rank
    q = rank_of(b, indices, "Gather backward")
    value = b.value(indices)
    if value is not None:
        if shape[axis] is None and (value < 0).any():
            unsupported(b, "negative indices need a static size along the gathered axis")
        idx = b.const(np.where(value < 0, value + (shape[axis] or 0), value).astype(np.int64)[..., None], np.int64)
    else:
        idx = b.add("Cast", [indices], to=onnx.TensorProto.INT64)
        # negative indices count from the end: the size along `axis`, read at run time where it is not static
        size = b.const(shape[axis], np.int64) if shape[axis] is not None else b.add(
            "Gather", [b.add("Shape", [data]), b.const(axis, np.int64)])
        idx = b.add("Where", [b.add("Less", [idx, b.const(0, np.int64)]), b.add("Add", [idx, size]), idx])
        idx = b.add("Unsqueeze", [idx, b.const([-1], np.int64)])
    # updates: g with the index axes first, then the data axes before and after `axis`
    perm_g = list(range(axis, axis + q)) + list(range(axis)) + list(range(axis + q, rank - 1 + q))
    g = gy[0] if perm_g == sorted(perm_g) else b.add("Transpose", [gy[0]], perm=perm_g)
    front = [axis] + [i for i in range(rank) if i != axis]
    zeros_shape = b.add("Gather", [b.add("Shape", [data]), b.const(front, np.int64)])
    zeros = b.add("ConstantOfShape", [zeros_shape],
                  value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    scattered = b.add("ScatterND", [zeros, idx, g], reduction="add")
    if axis == 0:
        return [scattered, None]
    return [b.add("Transpose", [scattered], perm=[int(p) for p in np.argsort(front)]), None]


def _slice_params(b, node, rank):
    """(starts, ends, axes, steps) from the inputs (opset >= 10) or the attributes (opset 1)."""
    starts = const_ints(b, node, 1, "starts", "Slice starts")
    ends = const_ints(b, node, 2, "ends", "Slice ends")
    axes = const_ints(b, node, 3, "axes", "Slice axes")
    steps = const_ints(b, node, 4, None, "Slice steps")
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    return starts, ends, axes, steps


def _slice_indices(start: int, end: int, step: int, dim: int) -> list[int]:
    """The positions Slice picks along one axis, clamped as the ONNX spec says (which differs from Python's
    slices for negative steps: an end of -1 after adjustment means 'through index 0')."""
    if step == 0:
        raise ValueError("step 0")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return list(range(start, end, step))


def slice_rule(b, node, gy, want):
    """Step 1 on every sliced axis: one Pad with zeros. Other steps: per axis, a constant 0/1 matrix places
    each picked position (MatMul), which also handles reversal (negative steps)."""
    x = node.input[0]
    shape = b.static_shape(x, "Slice backward")
    rank = len(shape)
    starts, ends, axes, steps = _slice_params(b, node, rank)
    pads = [0] * (2 * rank)
    picks = []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        dim = shape[ax]
        if dim is None:
            # Keras Cropping2D (tf2onnx) slices every axis, the dynamic batch included, from 0 to the end
            if st == 1 and (s == 0 or s <= -(2 ** 31)) and e >= 2 ** 31 - 1:
                continue
            unsupported(b, f"sliced axis {ax} must be static")
        idx = _slice_indices(s, e, st, dim)
        if not idx:
            return [b.zeros_like(x)] + [None] * (len(node.input) - 1)
        if st == 1:
            pads[ax], pads[rank + ax] = idx[0], dim - 1 - idx[-1]
        else:
            picks.append((ax, idx, dim))
    g = gy[0]
    for ax, idx, dim in picks:
        matrix = np.zeros((len(idx), dim), np.float32)
        matrix[np.arange(len(idx)), idx] = 1.0
        g = apply_along_axis(b, g, ax, rank, matrix)
    if any(pads):
        g = b.add("Pad", [g, b.const(pads, np.int64)])
    return [g] + [None] * (len(node.input) - 1)


def split_rule(b, node, gy, want):
    """Concatenate the outputs' gradients; an output nobody differentiates contributes zeros."""
    axis = attrs(node).get("axis", 0)
    parts = [g if g is not None else b.zeros_like(o) for g, o in zip(gy, node.output)]
    return [b.add("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)


def expand_rule(b, node, gy, want):
    return [b.unbroadcast(gy[0], node.input[0], node.output[0]), None]


def tile_rule(b, node, gy, want):
    """Each input element appears once per tile: view the gradient as (r0, d0, r1, d1, ...) and sum the r's."""
    x = node.input[0]
    shape = b.static_shape(x, "Tile backward")
    repeats = const_ints(b, node, 1, None, "Tile repeats")
    if sum(d is None for d in shape) > 1:
        unsupported(b, "at most one dynamic axis is supported")
    view = []
    for r, d in zip(repeats, shape):
        view += [r, -1 if d is None else d]
    summed = b.add("ReduceSum", [b.add("Reshape", [gy[0], b.const(view, np.int64)]),
                                 b.const(list(range(0, 2 * len(shape), 2)), np.int64)], keepdims=0)
    return [summed, None]


def _static_chw(b, x, what):
    shape = b.static_shape(x, what)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        unsupported(b, "needs a 4-D input with static channels and spatial size")
    return shape[1:]


def depth_to_space_rule(b, node, gy, want):
    """The forward is a permutation; DCR's inverse is SpaceToDepth, CRD's is undone by reshape/transpose."""
    a = attrs(node)
    bs = int(a["blocksize"])
    mode = a.get("mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "DCR":
        return [b.add("SpaceToDepth", [gy[0]], blocksize=bs)]
    c, h, w = _static_chw(b, node.input[0], "DepthToSpace backward")
    blocks = b.add("Reshape", [gy[0], b.const([0, c // (bs * bs), h, bs, w, bs], np.int64)])
    # forward permutation (0, 1, 4, 2, 5, 3) took (N, C', bs, bs, H, W) to (N, C', H, bs, W, bs)
    back = b.add("Transpose", [blocks], perm=[0, 1, 3, 5, 2, 4])
    return [b.add("Reshape", [back, b.const([0, c, h, w], np.int64)])]


def space_to_depth_rule(b, node, gy, want):
    return [b.add("DepthToSpace", [gy[0]], blocksize=int(attrs(node)["blocksize"]), mode="DCR")]


# --- Resize / Upsample: separable per axis, so the gradient is one constant matrix per resized axis -----------

def _resize_matrix(b, node, d_in: int, d_out: int, scale: float | None, roi: tuple | None) -> np.ndarray:
    """The (d_out, d_in) matrix of the node's 1-D interpolation along one axis, measured by resizing an
    identity with onnx's reference implementation under the node's own attributes."""
    from onnx.reference import ReferenceEvaluator

    keep = {"mode", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside", "extrapolation_value",
            "nearest_mode", "antialias"}
    node_attrs = {k: v for k, v in attrs(node).items() if k in keep}
    node_attrs["extrapolation_value"] = 0.0  # the constant outside the crop box is an offset, not a weight
    opset = max(b.opset, 18) if node_attrs.get("antialias") else max(b.opset, 13)
    inputs = ["x", "roi"]
    inits = [onnx.numpy_helper.from_array(np.array(
        [0.0, roi[0], 1.0, roi[1]] if roi else [], np.float32), "roi")]
    if scale is not None:
        inputs.append("scales")
        inits.append(onnx.numpy_helper.from_array(np.array([1.0, scale], np.float32), "scales"))
    else:
        inputs += ["", "sizes"]
        inits.append(onnx.numpy_helper.from_array(np.array([d_in, d_out], np.int64), "sizes"))
    graph = helper.make_graph(
        [helper.make_node("Resize", inputs, ["y"], **node_attrs)], "axis",
        [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [d_in, d_in])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # float64 coordinates: a sample landing exactly on the crop box's edge stays inside, as in onnxruntime
    out = ReferenceEvaluator(model).run(None, {"x": np.eye(d_in, dtype=np.float64)})[0]
    if out.shape != (d_in, d_out):
        unsupported(b, f"cannot reproduce the resize along one axis ({d_in} -> {d_out}, got {out.shape[1]})")
    return out.T.astype(np.float64)


def _resize_backward(b, node, g, scales, sizes, roi):
    x, y = node.input[0], node.output[0]
    xs = b.static_shape(x, "Resize backward")
    ys = b.static_shape(y, "Resize backward")
    rank = len(xs)
    mode = attrs(node).get("coordinate_transformation_mode", b"half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    for ax in range(rank):
        d_in, d_out = xs[ax], ys[ax]
        scale = None if scales is None else float(scales[ax])
        box = None if roi is None else (float(roi[ax]), float(roi[rank + ax]))
        # an axis kept at its size is untouched, except by the two modes that shift even at scale 1
        if (scale in (None, 1.0) and (d_in == d_out or (sizes is None and d_in is None and d_out is None))
                and mode not in ("tf_crop_and_resize", "tf_half_pixel_for_nn")):
            continue
        if d_in is None or d_out is None:
            unsupported(b, f"resized axis {ax} must be static")
        matrix = _resize_matrix(b, node, d_in, d_out, scale, box)
        if d_in == d_out and np.array_equal(matrix, np.eye(d_in)):
            continue
        g = apply_along_axis(b, g, ax, rank, matrix)
    return g


def _float_values(b, name):
    if not name:
        return None
    value = b.value(name)
    if value is None:
        unsupported(b, f"{name} must be constant")
    return None if value.size == 0 else [float(v) for v in value.reshape(-1)]


def resize_rule(b, node, gy, want):
    a = attrs(node)
    if a.get("keep_aspect_ratio_policy", b"stretch") not in (b"stretch", "stretch"):
        unsupported(b, "keep_aspect_ratio_policy other than 'stretch' is not supported")
    rank = rank_of(b, node.input[0], "Resize backward")
    if b.opset < 11 or len(node.input) == 2:  # Resize-10: (X, scales)
        roi, scales, sizes = None, _float_values(b, node.input[1]), None
    else:
        roi = _float_values(b, node.input[1]) if len(node.input) > 1 else None
        scales = _float_values(b, node.input[2]) if len(node.input) > 2 else None
        sizes = _float_values(b, node.input[3]) if len(node.input) > 3 else None
    mode = a.get("coordinate_transformation_mode", b"half_pixel")
    if mode not in (b"tf_crop_and_resize", "tf_crop_and_resize"):
        roi = None
    axes = a.get("axes")
    if axes is not None:  # opset 18: scales / sizes / roi for the listed axes only
        axes = [int(v) % rank for v in axes]

        def widen(values, fill):
            if values is None:
                return None
            full = [fill] * rank
            for i, ax in enumerate(axes):
                full[ax] = values[i]
            return full
        if roi is not None:
            n = len(axes)
            roi = widen(roi[:n], 0.0) + widen(roi[n:], 1.0)
        scales, sizes = widen(scales, 1.0), widen(sizes, None)
    g = _resize_backward(b, node, gy[0], scales, sizes, roi)
    return [g] + [None] * (len(node.input) - 1)


def upsample_rule(b, node, gy, want):
    """Upsample (opset 7-9) is Resize with asymmetric coordinates (nearest: floor)."""
    a = attrs(node)
    scales = a.get("scales")
    scales = _float_values(b, node.input[1]) if scales is None else [float(s) for s in scales]
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    as_resize = helper.make_node("Resize", list(node.input), list(node.output), name=node.name,
                                 mode="linear" if mode in ("linear", "bilinear") else "nearest",
                                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return [_resize_backward(b, as_resize, gy[0], scales, None, None)] + [None] * (len(node.input) - 1)


RULES = {"Gather": gather_rule, "Slice": slice_rule, "Split": split_rule, "Expand": expand_rule, "Tile": tile_rule,
         "DepthToSpace": depth_to_space_rule, "SpaceToDepth": space_to_depth_rule, "Resize": resize_rule,
         "Upsample": upsample_rule}
