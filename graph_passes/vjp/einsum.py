"""Backward rule of Einsum: the gradient of operand i is itself an Einsum of the output gradient with the other
operands, producing operand i's subscripts; subscripts only operand i carries (summed away in the forward) are
broadcast back, and an ellipsis that operand i shared by broadcasting is summed back to its own shape."""

from __future__ import annotations

import numpy as np

from .._graph import attrs
from ._emit import unsupported

ELLIPSIS = "..."


def _tokens(term: str) -> list[str]:
    out, i = [], 0
    while i < len(term):
        if term.startswith(ELLIPSIS, i):
            out.append(ELLIPSIS)
            i += 3
        else:
            out.append(term[i])
            i += 1
    return out


def parse_equation(equation: str) -> tuple[list[list[str]], list[str]]:
    """(input terms, output term) as token lists; the implicit output is every subscript used once, sorted,
    after the ellipsis (numpy's convention, which ONNX follows)."""
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = [_tokens(t) for t in lhs.split(",")]
    if "->" in eq:
        return terms, _tokens(rhs)
    letters = [t for term in terms for t in term if t != ELLIPSIS]
    single = sorted(t for t in set(letters) if letters.count(t) == 1)
    return terms, ([ELLIPSIS] if any(ELLIPSIS in t for t in terms) else []) + single


def _dims(term: list[str], shape: tuple) -> list:
    """Per token its size: a letter one dim, the ellipsis the list of dims it covers."""
    ell = len(shape) - (len(term) - (1 if ELLIPSIS in term else 0))
    out, i = [], 0
    for t in term:
        if t == ELLIPSIS:
            out.append(list(shape[i:i + ell]))
            i += ell
        else:
            out.append(shape[i])
            i += 1
    return out


def _broadcast(shapes: list[list]) -> list:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for k in range(rank):
        ds = [s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0]
        known = [d for d in ds if d is not None and d != 1]
        out.append(known[0] if known else (None if None in ds else 1))
    return out


def einsum_rule(b, node, gy, want):
    eq = attrs(node)["equation"]
    eq = eq.decode() if isinstance(eq, bytes) else eq
    terms, out_term = parse_equation(eq)
    shapes = [b.static_shape(x, "Einsum backward") for x in node.input]
    ell_shapes = []
    for term, shape in zip(terms, shapes):
        dims = _dims(term, shape)
        ell_shapes.append(dims[term.index(ELLIPSIS)] if ELLIPSIS in term else [])
    grads = []
    for i, (term, x) in enumerate(zip(terms, node.input)):
        if not want[i]:
            grads.append(None)
            continue
        letters = [t for t in term if t != ELLIPSIS]
        if len(set(letters)) != len(letters):
            unsupported(b, "repeated subscripts within one operand (diagonals) are not supported")
        others = [t for j, t in enumerate(terms) if j != i]
        available = set(out_term).union(*others) if others else set(out_term)
        if ELLIPSIS in term and ELLIPSIS not in out_term:
            unsupported(b, "an ellipsis summed away in the forward is not supported")
        kept = [t for t in term if t in available]
        inputs = [gy[0]] + [x_j for j, x_j in enumerate(node.input) if j != i]
        equation = ",".join("".join(t) for t in [out_term] + others) + "->" + "".join(kept)
        g = b.add("Einsum", inputs, equation=equation)
        if ELLIPSIS in term:
            g = _sum_ellipsis(b, g, kept, ell_shapes[i], _broadcast(ell_shapes))
        own = [t for t in term if t not in available]
        if own:
            positions, k = [], 0
            for t, d in zip(term, _dims(term, shapes[i])):
                width = len(d) if t == ELLIPSIS else 1
                if t in own:
                    positions.append(k)
                k += width
            g = b.add("Expand", [b.add("Unsqueeze", [g, b.const(positions, np.int64)]), b.add("Shape", [x])])
        grads.append(g)
    return grads


def _sum_ellipsis(b, g: str, kept: list[str], own_ell: list, grad_ell: list) -> str:
    """The gradient's ellipsis dims are the output's, the broadcast of every operand's: sum the extra leading
    ones away and the ones operand i had as 1."""
    extra = len(grad_ell) - len(own_ell)
    start = kept.index(ELLIPSIS)
    reduce_axes = [start + k for k in range(extra)]
    reduce_axes += [start + extra + k for k, d in enumerate(own_ell) if d == 1 and grad_ell[extra + k] != 1]
    if not reduce_axes:
        return g
    g = b.add("ReduceSum", [g, b.const(reduce_axes, np.int64)], keepdims=1)
    if extra:
        g = b.add("Squeeze", [g, b.const(list(range(start, start + extra)), np.int64)])
    return g


RULES = {"Einsum": einsum_rule}
