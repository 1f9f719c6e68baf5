"""LRP composites, rule-map files, the relevance runner and the rule / conservation reports.

A composite assigns an LRPRule (graph_passes.lrp) to every node of the canonical graph: user entries
(predicate -> rule, first match wins), then the composite's rules for linear layers (conv = Conv,
dense = Gemm/MatMul, first = the linear layers nearest the input, as zennit's first layer), then the base map
(activations and unfolded BatchNorm pass, residual Add / average pools Norm, MaxPool winner-take-all, shape ops
route, Mul gates hold the gate fixed).

Conventions (aligned with zennit 0.5): stabiliser z + eps*sign(z), sign(0) = +1, eps = 1e-6 everywhere; z+ and
alpha-beta keep the positive (negative) bias in the positive (negative) denominator; flat zeroes the bias; the
box rule's bias cancels; gamma masks by the sign of the forward output. Initial relevance: "logit" = one-hot x
logit (zennit's usual `attr_output = onehot * output`), "one" = one-hot, "contrastive" = 1 at the target and
-1/C elsewhere (Relevance-CAM's CLRP, methods-spec section 2), "sglrp" = y_c (onehot - y) with y = softmax.

Bias handling is a parameter of every composite (`bias`, graph_passes.lrp.BIAS_MODES): "keep" (the rules as
zennit defines them; the named composites, checked against zennit) or "zero" (zennit's zero_params=["bias"] on
every linear layer; the `-nobias` composites). With BatchNorm folded, a layer's bias holds the BN shift, and on
trained networks such biases absorb most of the relevance: docs/lrp-bias.md has the numbers behind the default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import onnx

import graph_passes as gp
from graph_passes import lrp as R

from ..errors import SaliencyError

@dataclass(frozen=True)
class Match:
    """Node predicate. op: op types, or 'conv' / 'dense' / 'linear'; name: regex (re.search); first / last:
    only the linear layers nearest the input / output (None = either)."""

    op: tuple | None = None
    name: str | None = None
    first: bool | None = None
    last: bool | None = None

    def matches(self, node: onnx.NodeProto, a: R.LRPAnalysis) -> bool:
        if self.op is not None:
            layer = a.linear.get(node.name)
            kinds = {node.op_type}
            if layer is not None:
                kinds |= {layer.kind, "linear"}
            if not kinds & set(self.op):
                return False
        if self.name is not None and not re.search(self.name, node.name):
            return False
        if self.first is not None and (node.name in a.first) != self.first:
            return False
        if self.last is not None and (node.name in a.last) != self.last:
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.op:
            parts.append("|".join(self.op))
        if self.name:
            parts.append(f"name~{self.name}")
        if self.first is not None:
            parts.append("first" if self.first else "not first")
        if self.last is not None:
            parts.append("last" if self.last else "not last")
        return " & ".join(parts) or "any"


@dataclass(frozen=True)
class Composite:
    name: str
    entries: tuple = ()                 # ((Match, LRPRule), ...) first match wins
    base_overrides: tuple = ()          # ((op type, LRPRule), ...) replacing base-map rules
    stabilizer: float = 1e-6

    def assign(self, model: onnx.ModelProto, analysis: R.LRPAnalysis | None = None) -> dict:
        """node name -> LRPRule for every node a rule covers (others are reported / rejected later)."""
        a = analysis or R.analyze(model)
        overrides = dict(self.base_overrides)
        out = {}
        for node in model.graph.node:
            rule = None
            for match, r in self.entries:
                if match.matches(node, a):
                    if r.kind == "linear" and node.name not in a.linear:
                        continue  # a linear rule only binds linear layers
                    if node.name in a.tail_of and r.kind != "pass":
                        continue  # a fused tail's affine map is already inside its layer's rule
                    rule = r
                    break
            if rule is None and node.name not in a.linear:
                rule = overrides.get(node.op_type) if node.name not in a.tail_of else None
                if rule is not None:
                    try:  # an override binds the nodes of its op type it can apply to (CP-LRP: products only)
                        R.check_rule(rule, node, a)
                    except gp.GraphPassError:
                        rule = None
                rule = rule or R.base_rule(node, a, self.stabilizer)
            if rule is not None:
                try:
                    R.check_rule(rule, node, a)
                except gp.GraphPassError as err:
                    raise SaliencyError(f"composite {self.name}: {err}") from err
                out[node.name] = rule
        return out

    def with_entries(self, entries, name: str | None = None) -> "Composite":
        return Composite(name or self.name, tuple(entries) + self.entries, self.base_overrides, self.stabilizer)

    def with_bias(self, bias: str) -> "Composite":
        """Every linear rule of this composite with bias handling `bias` ("keep" returns it unchanged);
        "zero" names it `<name>-nobias`."""
        if bias == "keep":
            return self
        entries = tuple((m, R.with_bias(r, bias)) for m, r in self.entries)
        return replace(self, name=f"{self.name}-nobias", entries=entries)


CONV, DENSE, ANY_LINEAR = Match(op=("conv",)), Match(op=("dense",)), Match(op=("linear",))
FIRST = Match(op=("linear",), first=True)
FIRST_CONV = Match(op=("conv",), first=True)


def epsilon_plus_flat(epsilon=1e-6, stabilizer=1e-6) -> Composite:
    return Composite("epsilon-plus-flat", ((FIRST, R.Flat(stabilizer)), (CONV, R.ZPlus(stabilizer)),
                                           (DENSE, R.Epsilon(epsilon))), stabilizer=stabilizer)


def epsilon_plus(epsilon=1e-6, stabilizer=1e-6) -> Composite:
    return Composite("epsilon-plus", ((CONV, R.ZPlus(stabilizer)), (DENSE, R.Epsilon(epsilon))),
                     stabilizer=stabilizer)


def epsilon_gamma_box(low, high, epsilon=1e-6, gamma=0.25, stabilizer=1e-6) -> Composite:
    return Composite("epsilon-gamma-box", ((FIRST_CONV, R.ZBox(low, high, stabilizer)),
                                           (CONV, R.Gamma(gamma, stabilizer)), (DENSE, R.Epsilon(epsilon))),
                     stabilizer=stabilizer)


def epsilon_alpha2_beta1(epsilon=1e-6, stabilizer=1e-6) -> Composite:
    return Composite("epsilon-alpha2-beta1", ((CONV, R.AlphaBeta(2, 1, stabilizer)), (DENSE, R.Epsilon(epsilon))),
                     stabilizer=stabilizer)


def epsilon_alpha2_beta1_flat(epsilon=1e-6, stabilizer=1e-6) -> Composite:
    return Composite("epsilon-alpha2-beta1-flat", ((FIRST, R.Flat(stabilizer)), (CONV, R.AlphaBeta(2, 1, stabilizer)),
                                                   (DENSE, R.Epsilon(epsilon))), stabilizer=stabilizer)


def excitation_backprop(stabilizer=1e-6) -> Composite:
    """zennit ExcitationBackprop: z+ on every linear layer, Norm on sums and average pools; activations and
    BatchNorm keep their plain gradient (zennit maps no rule to them)."""
    grad = R.Gradient()
    return Composite("excitation-backprop", ((ANY_LINEAR, R.ZPlus(stabilizer)),),
                     base_overrides=(("Relu", grad), ("LeakyRelu", grad), ("Clip", grad), ("Sigmoid", grad),
                                     ("Tanh", grad), ("BatchNormalization", grad)), stabilizer=stabilizer)


def _layer_rule(gamma, epsilon, stabilizer):
    return R.Gamma(float(gamma), stabilizer) if gamma else R.Epsilon(epsilon)


def attnlrp(epsilon=1e-6, conv_gamma=0.0, dense_gamma=0.0, stabilizer=1e-6) -> Composite:
    """AttnLRP (Achtibat et al., ICML 2024): epsilon on every weighted layer (or the gamma rule with
    conv_gamma / dense_gamma > 0, as LXT's tuned ViT heatmaps), the uniform rule on products of two activations
    (attention's Q K^T and A V, gating), Softmax by its Jacobian times the input, LayerNormalization with its
    standard deviation held fixed, GELU / SiLU and other pointwise activations as identity (the base map)."""
    return Composite("attnlrp", ((CONV, _layer_rule(conv_gamma, epsilon, stabilizer)),
                                 (DENSE, _layer_rule(dense_gamma, epsilon, stabilizer))),
                     base_overrides=(("LayerNormalization", R.FixedNormaliser(stabilizer)),), stabilizer=stabilizer)


def cp_lrp(epsilon=1e-6, conv_gamma=0.0, dense_gamma=0.0, stabilizer=1e-6) -> Composite:
    """CP-LRP (Ali et al. 2022) inside attention, AttnLRP outside (LXT's `cp_LRP` map for torchvision ViT): the
    attention probabilities are held fixed, so no relevance flows into the Softmax, Q or K."""
    base = attnlrp(epsilon, conv_gamma, dense_gamma, stabilizer)
    cp = R.Conservative(stabilizer)
    return Composite("cp-lrp", base.entries, base.base_overrides + (("MatMul", cp), ("Mul", cp)),
                     stabilizer=stabilizer)


def uniform(rule: R.LRPRule, name: str | None = None, stabilizer: float = 1e-6) -> Composite:
    """The same rule on every linear layer (LRP-0, epsilon, z+ ...), base map elsewhere (Norm with
    `stabilizer`; 0 = exact proportional split, 0 where the sum is 0)."""
    return Composite(name or rule.name, ((ANY_LINEAR, rule),), stabilizer=stabilizer)


COMPOSITES = {
    "epsilon-plus-flat": epsilon_plus_flat, "epsilon-plus": epsilon_plus, "epsilon-gamma-box": epsilon_gamma_box,
    "epsilon-alpha2-beta1": epsilon_alpha2_beta1, "epsilon-alpha2-beta1-flat": epsilon_alpha2_beta1_flat,
    "excitation-backprop": excitation_backprop, "attnlrp": attnlrp, "cp-lrp": cp_lrp,
    "lrp0": lambda **k: uniform(R.LRP0(), "lrp0", stabilizer=0.0), "epsilon": lambda **k: uniform(R.Epsilon(), "epsilon"),
    "zplus": lambda **k: uniform(R.ZPlus(), "zplus"),
    "alpha1-beta0": lambda **k: uniform(R.AlphaBeta(1, 0), "alpha1-beta0"),
}


NO_BIAS = "-nobias"
# What `-m lrp` and `export-explainer --method lrp` use without --composite: the numbers that chose it are in
# docs/lrp-bias.md (on EfficientNet-Lite0 it keeps ~100x more of the logit at the input than epsilon-plus-flat,
# whose folded BatchNorm shifts absorb all but ~6e-4 of it, at about the same deletion/insertion scores).
DEFAULT_COMPOSITE = "epsilon-plus-flat-nobias"


def composite_names() -> list[str]:
    """The built-in composites and their bias-free (`-nobias`) variants."""
    return sorted(list(COMPOSITES) + [n + NO_BIAS for n in COMPOSITES if n != "excitation-backprop"])


def get_composite(name, low=None, high=None, **params) -> Composite:
    """A built-in composite by name (dashes or underscores; epsilon-gamma-box needs low/high)."""
    if isinstance(name, Composite):
        return name
    key = str(name).lower().replace("_", "-")
    bias = params.pop("bias", "keep")
    if key.endswith(NO_BIAS) and key != "excitation-backprop" + NO_BIAS:
        key, bias = key[:-len(NO_BIAS)], "zero"
    if key not in COMPOSITES:
        raise SaliencyError(f"--composite {name!r}: unknown; known: {', '.join(composite_names())}")
    if key == "epsilon-gamma-box":
        if low is None or high is None:
            raise SaliencyError("--composite epsilon-gamma-box needs the input bounds (low, high)")
        return epsilon_gamma_box(low, high, **params).with_bias(bias)
    return COMPOSITES[key](**params).with_bias(bias)


