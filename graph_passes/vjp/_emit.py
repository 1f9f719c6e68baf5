"""Building blocks the backward rules share: refusing cleanly, reading constant operands in every opset form,
reductions that emit valid nodes at opset 17 and 18+, and summing a gradient back to a broadcast operand."""

from __future__ import annotations

import numpy as np

from .._graph import GraphPassError, attrs


def unsupported(b, why: str):
    raise GraphPassError(f"{b.node.name} ({b.node.op_type}): {why}")


def rank_of(b, name: str, what: str) -> int:
    return len(b.static_shape(name, what))


def const_ints(b, node, index: int, attr: str | None = None, what: str = "") -> list[int] | None:
    """An int list given as the node's input `index` (opset >= 10/13/18 forms) or as attribute `attr`
    (older forms); None when the node has neither. A non-constant input is refused."""
    if len(node.input) > index and node.input[index]:
        value = b.value(node.input[index])
        if value is None:
            unsupported(b, f"{what or node.input[index]} must be constant")
        return [int(v) for v in np.ravel(value)]
    if attr is not None:
        value = attrs(node).get(attr)
        if value is not None:
            return [int(v) for v in np.ravel(value)]
    return None


def reduce_mean(b, t: str, axes: list[int], keepdims: int = 1) -> str:
    """ReduceMean over `axes`: an input from opset 18, an attribute before (the model's own opset)."""
    if b.opset >= 18:
        return b.add("ReduceMean", [t, b.const(axes, np.int64)], keepdims=keepdims)
    return b.add("ReduceMean", [t], axes=list(axes), keepdims=keepdims)


def reduce_sum(b, t: str, axes: list[int], keepdims: int = 1) -> str:
    return b.add("ReduceSum", [t, b.const(axes, np.int64)], keepdims=keepdims)


def sum_to(b, grad: str, grad_shape, like: str) -> str:
    """Sum `grad` (shaped `grad_shape`, static where it matters) down to the shape of the operand `like` that
    was broadcast to it: leading axes `like` lacks, and axes where `like` has 1."""
    s_in = b.static_shape(like, "broadcasting backward")
    lead = len(grad_shape) - len(s_in)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(s_in) if d == 1 and grad_shape[lead + i] != 1]
    if not axes:
        return grad
    summed = reduce_sum(b, grad, axes)
    return b.add("Reshape", [summed, b.add("Shape", [like])])


def move_axis_last(b, t: str, axis: int, rank: int) -> tuple[str, list[int] | None]:
    """Transpose `axis` to the end; returns the tensor and the inverse permutation (None: nothing moved)."""
    if axis == rank - 1:
        return t, None
    perm = [i for i in range(rank) if i != axis] + [axis]
    return b.add("Transpose", [t], perm=perm), [int(p) for p in np.argsort(perm)]


def apply_along_axis(b, t: str, axis: int, rank: int, matrix: np.ndarray) -> str:
    """t contracted along `axis` with a constant matrix (rows: t's axis, columns: the result's axis)."""
    moved, back = move_axis_last(b, t, axis, rank)
    out = b.add("MatMul", [moved, b.const(np.ascontiguousarray(matrix, np.float32))])
    return out if back is None else b.add("Transpose", [out], perm=back)


def keep_reduced(b, node, t: str, axes: list[int]) -> str:
    """A reduction's output (or its gradient) with the reduced axes kept as size 1 (undoing keepdims=0)."""
    if attrs(node).get("keepdims", 1):
        return t
    return b.add("Unsqueeze", [t, b.const(axes, np.int64)])
