"""Reverse mode as ONNX: the builder (builder.py) walks the nodes between the requested tensors and the scores
and asks each node's rule (rules.py: PLAIN exact gradients, GUIDED for guided backprop) to emit its backward."""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from . import rules
from .builder import (NON_DIFFERENTIABLE, Rule, RuleMap, UnsupportedOpsError, VJPBuilder, differentiable_path,
                      grad_name)
from .builder import append_vjp as _append_vjp
from .rules import GUIDED, PLAIN


def append_vjp(model: onnx.ModelProto, output: str, wrt: list[str], *, seed: str | None = None,
               rules: RuleMap | None = None, node_rules: Mapping[str, Rule] | None = None,
               prefix: str = "vjp/") -> onnx.ModelProto:
    """builder.append_vjp with the exact gradients (PLAIN) as the default rule set."""
    return _append_vjp(model, output, wrt, seed=seed, rules=PLAIN if rules is None else rules,
                       node_rules=node_rules, prefix=prefix)


def supported_ops(rules: RuleMap | None = None) -> set[str]:
    """Op types with a backward rule in `rules` (default PLAIN), plus the ops that carry no gradient."""
    return set(PLAIN if rules is None else rules) | NON_DIFFERENTIABLE


__all__ = ["append_vjp", "supported_ops", "differentiable_path", "grad_name", "UnsupportedOpsError", "VJPBuilder",
           "NON_DIFFERENTIABLE",
           "Rule", "RuleMap", "PLAIN", "GUIDED", "rules"]
