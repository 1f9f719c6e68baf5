"""LRP for users: composites (which rule on which node), rule-map files, the relevance runner and the reports.
The rules themselves are data in graph_passes.lrp; this package chooses them and runs the relevance graph."""

from .composites import (ANY_LINEAR, COMPOSITES, CONV, DEFAULT_COMPOSITE, DENSE, FIRST, FIRST_CONV, Composite, Match, composite_names,
                         epsilon_alpha2_beta1, epsilon_alpha2_beta1_flat, epsilon_gamma_box, epsilon_plus,
                         epsilon_plus_flat, excitation_backprop, get_composite, uniform)
from .relevance import (INITS, append_initial_relevance, build_relevance_graph, initial_total, relevance_at,
                        run_relevance)
from .report import conservation_table, format_conservation, rule_report
from .rule_maps import load_rule_map, parse_rule_map, resolve_composite

__all__ = ["Match", "Composite", "get_composite", "composite_names", "load_rule_map", "parse_rule_map",
           "resolve_composite", "relevance_at", "rule_report", "conservation_table", "format_conservation",
           "initial_total", "INITS", "epsilon_plus_flat", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1",
           "epsilon_alpha2_beta1_flat", "excitation_backprop", "uniform", "COMPOSITES", "CONV", "DENSE",
           "ANY_LINEAR", "DEFAULT_COMPOSITE", "FIRST", "FIRST_CONV", "append_initial_relevance", "build_relevance_graph", "run_relevance"]
