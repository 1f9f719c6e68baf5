"""Backward rules of elementwise ops beyond plain arithmetic: smooth activations (GELU in both approximations,
Erf, Softplus, Mish, ELU family), powers and roots, selections (Where, Min/Max) and piecewise-constant ops."""

from __future__ import annotations

import math

from .._graph import attrs


def _mul(b, *ts):
    out = ts[0]
    for t in ts[1:]:
        out = b.add("Mul", [out, t])
    return out


def _one_input(b, node, g):
    return [g] + [None] * (len(node.input) - 1)


def erf_rule(b, node, gy, want):
    x = node.input[0]
    slope = b.add("Exp", [b.add("Neg", [b.add("Mul", [x, x])])])
    return [_mul(b, gy[0], slope, b.const(2.0 / math.sqrt(math.pi)))]


def gelu_rule(b, node, gy, want):
    """none: Phi(x) + x phi(x); tanh: 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x = node.input[0]
    mode = attrs(node).get("approximate", b"none")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "tanh":
        k = math.sqrt(2.0 / math.pi)
        x2 = b.add("Mul", [x, x])
        inner = _mul(b, x, b.add("Add", [b.const(1.0), b.add("Mul", [x2, b.const(0.044715)])]), b.const(k))
        t = b.add("Tanh", [inner])
        du = b.add("Mul", [b.add("Add", [b.const(1.0), b.add("Mul", [x2, b.const(3 * 0.044715)])]), b.const(k)])
        dt = b.add("Sub", [b.const(1.0), b.add("Mul", [t, t])])
        slope = b.add("Add", [b.add("Mul", [b.add("Add", [b.const(1.0), t]), b.const(0.5)]),
                              _mul(b, x, dt, du, b.const(0.5))])
    else:
        cdf = b.add("Mul", [b.add("Add", [b.add("Erf", [b.add("Mul", [x, b.const(1.0 / math.sqrt(2.0))])]),
                                          b.const(1.0)]), b.const(0.5)])
        pdf = b.add("Mul", [b.add("Exp", [b.add("Mul", [b.add("Mul", [x, x]), b.const(-0.5)])]),
                            b.const(1.0 / math.sqrt(2.0 * math.pi))])
        slope = b.add("Add", [cdf, b.add("Mul", [x, pdf])])
    return [b.add("Mul", [gy[0], slope])]


def sqrt_rule(b, node, gy, want):
    return [b.add("Div", [b.add("Mul", [gy[0], b.const(0.5)]), node.output[0]])]


def pow_rule(b, node, gy, want):
    x, p = node.input
    g, y = gy[0], node.output[0]
    gx = gp = None
    if want[0]:
        value = b.value(p)
        if value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 2.0:
            slope = b.add("Mul", [x, b.const(2.0)])
        else:
            if value is not None:
                pf = b.const(value.astype("float32"))
            else:  # an integer exponent tensor (allowed since opset 12) joins the float arithmetic as float
                info = b.infos.get(p)
                pf = p if info is None or info.is_float else b.add("Cast", [p], to=1)
            slope = b.add("Mul", [pf, b.add("Pow", [x, b.add("Sub", [pf, b.const(1.0)])])])
        gx = b.unbroadcast(b.add("Mul", [g, slope]), x, y)
    if want[1]:  # d x^p / dp = y ln x
        gp = b.unbroadcast(_mul(b, g, y, b.add("Log", [x])), p, y)
    return [gx, gp]


def abs_rule(b, node, gy, want):
    return [b.add("Mul", [gy[0], b.add("Sign", [node.input[0]])])]


def softplus_rule(b, node, gy, want):
    return [b.add("Mul", [gy[0], b.add("Sigmoid", [node.input[0]])])]


def mish_rule(b, node, gy, want):
    """y = x tanh(softplus(x)): dy/dx = t + x sigmoid(x) (1 - t^2)."""
    x = node.input[0]
    t = b.add("Tanh", [b.add("Softplus", [x])])
    dt = b.add("Sub", [b.const(1.0), b.add("Mul", [t, t])])
    slope = b.add("Add", [t, _mul(b, x, b.add("Sigmoid", [x]), dt)])
    return [b.add("Mul", [gy[0], slope])]


def _positive(b, x):
    return b.add("Greater", [x, b.const(0.0)])


def elu_rule(b, node, gy, want):
    """x <= 0: alpha (exp(x) - 1) has slope y + alpha."""
    alpha = attrs(node).get("alpha", 1.0)
    neg = b.add("Add", [node.output[0], b.const(alpha)])
    return [b.add("Mul", [gy[0], b.add("Where", [_positive(b, node.input[0]), b.const(1.0), neg])])]


def selu_rule(b, node, gy, want):
    a = attrs(node)
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    neg = b.add("Add", [node.output[0], b.const(alpha * gamma)])
    return [b.add("Mul", [gy[0], b.add("Where", [_positive(b, node.input[0]), b.const(gamma), neg])])]


def celu_rule(b, node, gy, want):
    alpha = attrs(node).get("alpha", 1.0)
    x = node.input[0]
    neg = b.add("Exp", [b.add("Div", [x, b.const(alpha)])])
    return [b.add("Mul", [gy[0], b.add("Where", [_positive(b, x), b.const(1.0), neg])])]


def prelu_rule(b, node, gy, want):
    x, slope = node.input
    g, y = gy[0], node.output[0]
    pos = _positive(b, x)
    gx = b.add("Where", [pos, g, b.add("Mul", [g, slope])]) if want[0] else None
    gs = None
    if want[1]:
        gs = b.unbroadcast(b.add("Where", [pos, b.const(0.0), b.add("Mul", [g, x])]), slope, y)
    return [gx, gs]


def thresholded_relu_rule(b, node, gy, want):
    alpha = attrs(node).get("alpha", 1.0)
    return [b.add("Where", [b.add("Greater", [node.input[0], b.const(alpha)]), gy[0], b.const(0.0)])]


def softsign_rule(b, node, gy, want):
    d = b.add("Add", [b.const(1.0), b.add("Abs", [node.input[0]])])
    return [b.add("Div", [gy[0], b.add("Mul", [d, d])])]


def log_rule(b, node, gy, want):
    return [b.add("Div", [gy[0], node.input[0]])]


def reciprocal_rule(b, node, gy, want):
    y = node.output[0]
    return [b.add("Neg", [_mul(b, gy[0], y, y)])]


def zero_gradient_rule(b, node, gy, want):
    """Floor, Ceil, Round, Sign: piecewise constant, so the gradient is 0 almost everywhere (as autograd)."""
    return [None] * len(node.input)


def mod_rule(b, node, gy, want):
    """a - b q with q = floor(a/b) (fmod=0) or trunc(a/b) (fmod=1): da = 1, db = -q. A Mod on shape arithmetic
    never reaches here (integer tensors carry no gradient)."""
    a, c = node.input
    g, y = gy[0], node.output[0]
    ga = b.unbroadcast(g, a, y) if want[0] else None
    gc = None
    if want[1]:
        ratio = b.add("Div", [a, c])
        if attrs(node).get("fmod", 0):
            q = b.add("Mul", [b.add("Sign", [ratio]), b.add("Floor", [b.add("Abs", [ratio])])])
        else:
            q = b.add("Floor", [ratio])
        gc = b.unbroadcast(b.add("Neg", [b.add("Mul", [g, q])]), c, y)
    return [ga, gc]


def where_rule(b, node, gy, want):
    cond, x, z = node.input
    g, y = gy[0], node.output[0]
    zero = b.const(0.0)
    gx = b.unbroadcast(b.add("Where", [cond, g, zero]), x, y) if want[1] else None
    gz = b.unbroadcast(b.add("Where", [cond, zero, g]), z, y) if want[2] else None
    return [None, gx, gz]


def minmax_rule(b, node, gy, want):
    """Min/Max: the gradient goes to the operands equal to the result, split evenly among ties (as autograd's
    maximum/minimum)."""
    g, y = gy[0], node.output[0]
    if len(node.input) == 1:
        return [g]
    masks = [b.add("Equal", [x, y]) for x in node.input]
    count = b.add("Sum", [b.add("Cast", [m], to=1) for m in masks])
    share = b.add("Div", [g, count])
    return [b.unbroadcast(b.add("Where", [m, share, b.const(0.0)]), x, y) if w else None
            for x, m, w in zip(node.input, masks, want)]


def mean_rule(b, node, gy, want):
    share = b.add("Mul", [gy[0], b.const(1.0 / len(node.input))])
    return [b.unbroadcast(share, x, node.output[0]) if w else None for x, w in zip(node.input, want)]


RULES = {
    "Erf": erf_rule, "Gelu": gelu_rule, "Sqrt": sqrt_rule, "Pow": pow_rule, "Abs": abs_rule,
    "Softplus": softplus_rule, "Mish": mish_rule, "Elu": elu_rule, "Selu": selu_rule, "Celu": celu_rule,
    "PRelu": prelu_rule, "ThresholdedRelu": thresholded_relu_rule, "Softsign": softsign_rule, "Log": log_rule,
    "Reciprocal": reciprocal_rule, "Floor": zero_gradient_rule, "Ceil": zero_gradient_rule,
    "Round": zero_gradient_rule, "Sign": zero_gradient_rule, "Mod": mod_rule, "Where": where_rule,
    "Min": minmax_rule, "Max": minmax_rule, "Mean": mean_rule,
}
