"""Layer-wise relevance propagation as ONNX: rules as data (rules), the graph facts they need (analysis), and
the compiler that emits each node's rule as append_vjp backward nodes (compiler)."""

from .analysis import LINEAR_OPS, LinearLayer, LRPAnalysis, analyze, positive_support
from .compiler import (NORM_OPS, PASS_OPS, STRUCTURAL_OPS, WTA_OPS, append_lrp, base_rule, check_rule, compile_rules,
                       rule_reason)
from .rules import (BIAS_MODES, RULE_FACTORIES, AlphaBeta, Conservative, Epsilon, FixedNormaliser, Flat, Gamma, Gate,
                    Gradient, Group, LRP0, LRPRule, Norm, Pass, Proportional, Term, Uniform, UnpoolOverwrite,
                    WinnerTakeAll, WSquare, ZBox, ZPlus, make_rule, with_bias)

__all__ = ["Term", "Group", "LRPRule", "Epsilon", "LRP0", "ZPlus", "AlphaBeta", "Gamma", "ZBox", "Flat", "WSquare",
           "Pass", "Norm", "Gradient", "Uniform", "Conservative", "FixedNormaliser", "WinnerTakeAll", "UnpoolOverwrite",
           "Proportional", "Gate", "make_rule", "RULE_FACTORIES", "BIAS_MODES", "with_bias",
           "analyze", "positive_support", "LRPAnalysis", "LinearLayer", "append_lrp", "base_rule", "check_rule",
           "compile_rules", "rule_reason", "LINEAR_OPS", "PASS_OPS", "NORM_OPS", "STRUCTURAL_OPS", "WTA_OPS"]
