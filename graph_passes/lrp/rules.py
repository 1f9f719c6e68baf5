"""LRP rules as data (after zennit's BasicHook): a linear rule is a list of groups, each a list of terms.

See graph_passes.lrp.compiler for the propagation formula the compiler emits from these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# What a linear rule does with the layer's bias (after BatchNorm folding, the BN shift is part of it):
#   keep  the bias terms as each rule defines them (Bach et al., zennit's default): the bias sits in the
#         denominator z and takes its share of the relevance, which is lost to the input (a sink per layer,
#         the "sum R in" < "sum R out" of the conservation table)
#   zero  zennit's ``zero_params=["bias"]``: z is computed without the bias, so each layer passes on all the
#         relevance it receives (up to the stabiliser); the forward pass itself is unchanged
BIAS_MODES = ("keep", "zero")

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
    """One propagation rule. kind: linear | pass | norm | gradient | gate | proportional (MaxPool) | uniform
    (products of two activations; CP-LRP's variant marks its one group "stop-attention") | fixed-normaliser
    (LayerNormalization)."""

    name: str
    kind: str = "linear"
    groups: tuple = ()
    eps: float = 1e-6
    gamma: float = 0.0
    low: tuple | None = None
    high: tuple | None = None
    bias: str = "keep"  # BIAS_MODES; a "zero" rule's terms all carry bias "zero" (see with_bias)
    # "fuse": a layer's affine tail (BatchNorm, bias Add) is part of its weights and bias, as zennit's canonizers;
    # "pass": the rule sees the layer's own weights and bias and the tail passes relevance unchanged (the
    # Relevance-CAM reference code's BatchNorm2d.relprop)
    tails: str = "fuse"

    def describe(self) -> str:
        extra = []
        if self.kind in ("linear", "norm", "proportional", "uniform", "fixed-normaliser"):
            extra.append(f"eps={self.eps:g}")
        if self.gamma:
            extra.append(f"gamma={self.gamma:g}")
        if self.bias != "keep":
            extra.append(f"bias={self.bias}")
        return f"{self.name}({', '.join(extra)})" if extra else self.name

    @property
    def reuses_forward(self) -> bool:
        """z equals the layer's own forward output (LRP-0 / epsilon): no extra forward conv."""
        return (self.kind == "linear" and len(self.groups) == 1 and not self.groups[0].mask
                and self.groups[0].terms == (Term("x", "w", "b"),))


def with_bias(rule: LRPRule, bias: str) -> LRPRule:
    """`rule` with the bias handling `bias` (BIAS_MODES). "zero" replaces every term's bias by "zero" (zennit's
    zero_params=["bias"]); non-linear rules and rules without bias terms (flat) come back as they are."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias {bias!r}: expected one of {', '.join(BIAS_MODES)}")
    if rule.kind != "linear" or bias == rule.bias:
        return rule
    if bias == "keep":
        raise ValueError(f"rule {rule.name}: its bias terms were removed; make it again to keep them")
    if all(t.bias == "zero" for g in rule.groups for t in g.terms):
        return rule  # flat: no bias to remove
    groups = tuple(replace(g, terms=tuple(replace(t, bias="zero") for t in g.terms)) for g in rule.groups)
    return replace(rule, groups=groups, bias="zero")


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


def UnpoolOverwrite() -> LRPRule:
    """MaxPool as the SR-map reference notebook routes relevance: torch's max_unpool2d, which writes each window's
    relevance at its argmax, so where overlapping windows share an argmax the last window (row-major) overwrites
    the others instead of adding to them. Not conserving; only for reproducing that code."""
    return LRPRule("wta-overwrite", kind="unpool-overwrite")


def Proportional(stabilizer: float = 1e-6) -> LRPRule:
    """MaxPool alternative: split each window's relevance in proportion to its inputs."""
    return LRPRule("proportional", kind="proportional", eps=stabilizer)


def Gate() -> LRPRule:
    """Mul: the gate (constant, or the Sigmoid/HardSigmoid branch) is held fixed; all relevance to the signal."""
    return LRPRule("gate", kind="gate")


def Uniform(stabilizer: float = 1e-6) -> LRPRule:
    """AttnLRP's uniform rule for a product of two activations (MatMul, Mul): each operand gets half of the
    proportional (z-rule) share, R_a = 1/2 a (.) J_a^T (R / stab(y)), likewise b; a bilinear map's two shares
    each sum to half of R (Achtibat et al. 2024, eq. 7)."""
    return LRPRule("uniform", kind="uniform", eps=stabilizer)


def Conservative(stabilizer: float = 1e-6) -> LRPRule:
    """CP-LRP (Ali et al. 2022) on attention: the attention probabilities are held fixed, so all relevance of
    A @ V goes to V (the z-rule in V) and none reaches the Softmax, Q or K. Products without a Softmax operand
    fall back to the uniform rule."""
    return LRPRule("cp", kind="uniform", eps=stabilizer, groups=(Group((), mask="stop-attention"),))


def FixedNormaliser(stabilizer: float = 1e-6) -> LRPRule:
    """LayerNormalization with its standard deviation held fixed (AttnLRP's identity rule on the normaliser,
    LXT's stop-gradient on std): what is left, centring and the affine scale and shift, is linear in x and
    takes the z-rule, R_x = x (.) J^T (R / stab(y)); the shift absorbs its share like a bias."""
    return LRPRule("fixed-normaliser", kind="fixed-normaliser", eps=stabilizer)


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
    "wta-overwrite": lambda p: UnpoolOverwrite(),
    "proportional": lambda p: Proportional(p.get("stabilizer", 1e-6)), "gate": lambda p: Gate(),
    "uniform": lambda p: Uniform(p.get("stabilizer", 1e-6)), "cp": lambda p: Conservative(p.get("stabilizer", 1e-6)),
    "fixed-normaliser": lambda p: FixedNormaliser(p.get("stabilizer", 1e-6)),
    "fixednormaliser": lambda p: FixedNormaliser(p.get("stabilizer", 1e-6)),
}


def make_rule(name: str, **params) -> LRPRule:
    """Rule by name; ZBox takes low/high; any linear rule takes bias (keep | zero, see BIAS_MODES). Unknown names
    raise ValueError listing the known ones."""
    bias = params.pop("bias", "keep")
    return with_bias(_make_rule(name, **params), str(bias))


def _make_rule(name: str, **params) -> LRPRule:
    key = name.lower().replace("_", "").replace(" ", "")
    key = {"epsilon0": "lrp0", "zb": "zbox", "box": "zbox", "alpha2beta1": "alpha2beta1"}.get(key, key)
    if key == "zbox":
        if params.get("low") is None or params.get("high") is None:
            raise ValueError("rule zbox needs low and high bounds")
        return ZBox(params["low"], params["high"], params.get("stabilizer", 1e-6))
    if key not in RULE_FACTORIES:
        raise ValueError(f"unknown LRP rule {name!r}; known: {', '.join(sorted(set(RULE_FACTORIES) | {'zbox'}))}")
    return RULE_FACTORIES[key](params)


