"""Reports: the rule of every node before running, and per-node conservation (relevance in vs out)."""

from __future__ import annotations

import numpy as np

import graph_passes as gp
from graph_passes import lrp as R
from graph_passes._graph import ancestors

from .composites import Composite
from .relevance import build_relevance_graph, fold_affine_layers, run_relevance
from .rule_maps import resolve_composite

def rule_report(model, composite) -> list[str]:
    """Lines: every node's rule, BatchNorms folded (into what) or kept, residual Adds, nodes with no rule.
    `model` is a LoadedModel (or a canonical ModelProto); `composite` a Composite."""
    report = getattr(model, "report", None)
    score = getattr(model, "score_tensor", getattr(model, "canonical", model).graph.output[0].name)
    folded: list[str] = []
    canonical = fold_affine_layers(getattr(model, "canonical", model), {score}, folded)  # the graph LRP runs on
    a = R.analyze(canonical)
    rules = composite.assign(canonical, a)
    needed = ancestors(canonical.graph, [score])
    lines = [f"composite {composite.name}"]
    missing = []
    by_op: dict = {}  # op type -> {(rule name, reason): count}
    for node in canonical.graph.node:
        if (not any(o in needed for o in node.output) or not any(i in a.activations for i in node.input)
                or node.op_type in gp.vjp.NON_DIFFERENTIABLE):  # comparisons, shapes: no relevance flows
            continue
        rule = rules.get(node.name)
        tags = []
        if node.name in a.linear:
            layer = a.linear[node.name]
            tags.append(layer.kind)
            if node.name in a.first:
                tags.append("first")
            if node.name in a.last:
                tags.append("last")
            if layer.tails:
                tags.append("fused " + ", ".join(layer.tails))
            if node.input[0] in a.nonneg:
                tags.append("input>=0")
        if node.name in a.tail_of:
            tags.append(f"affine tail of {a.tail_of[node.name]}")
        if node.name in a.residual:
            tags.append("residual")
        if node.name in a.gates:
            tags.append(f"gate: relevance to input {a.gates[node.name]}")
        if rule is None:
            missing.append(node)
        else:
            key = (rule.name, R.rule_reason(rule, node, a))
            by_op.setdefault(node.op_type, {})[key] = by_op.get(node.op_type, {}).get(key, 0) + 1
        desc = rule.describe() if rule else "NO RULE"
        lines.append(f"{node.name}\t{node.op_type}\t{desc}" + (f"\t[{'; '.join(tags)}]" if tags else ""))
    if report is not None:
        lines += [f"BatchNormalization {bn} folded into {into}" for bn, into in report.folded_bn]
        lines += [f"BatchNormalization {bn} kept (no foldable producer)" for bn in report.kept_bn]
    lines += [line for line in folded if line.startswith(("folded", "MatMul"))]
    lines.append("rules by op type:")
    for op, rules_used in by_op.items():
        lines.append(f"  {op}: " + ", ".join(f"{name} x{count} ({why})" for (name, why), count in rules_used.items()))
    lines.append(f"residual adds: {len(a.residual)}")
    if missing:
        lines.append(f"nodes without a rule ({len(missing)}): "
                     + gp.summarize_nodes([(n.name, n.op_type) for n in missing]))
    else:
        lines.append("nodes without a rule: none")
    return lines


def conservation_table(engine, x: np.ndarray, targets=None, composite="epsilon-plus-flat", init: str = "logit",
                       rule_map=None, low=None, high=None) -> list[dict]:
    """Per node on the path: sum of relevance arriving (out) and leaving towards its inputs (in), per image.

    Debug path: every node's relevance is an extra graph output (slower, more memory). Rows:
    {"node", "op", "rule", "out": (N,), "in": (N,), "sink"}; a ratio in/out < 1 shows absorption, and "sink" names
    what absorbs there (see :func:`sink`).
    """
    model = engine.model
    comp = composite if isinstance(composite, Composite) else resolve_composite(engine, composite, rule_map,
                                                                                low, high)
    record: list = []
    score = model.score_tensor

    def build(canonical):
        record.clear()
        return build_relevance_graph(canonical, score, model.num_classes, (model.input_name,), comp, init,
                                     record=record)

    key = ("lrp-conservation", comp, init)
    sess, names, _ = engine.session(key, build)
    if not record and key in getattr(engine, "_lrp_records", {}):
        record[:] = engine._lrp_records[key]
    engine.__dict__.setdefault("_lrp_records", {})[key] = list(record)
    tensors = sorted({t for _, outs, ins in record for t in outs + ins})
    res = run_relevance(engine, sess, [score, gp.RESOLVED, gp.TARGET_SCORE, gp.grad_name(model.input_name)] + tensors,
               x, targets, 32, comp, (model.input_name,), init)
    rules = comp.assign(model.canonical)
    nodes = {n.name: n for n in model.canonical.graph.node}
    rows = []
    for name, outs, ins in record:
        def total(ts):
            return sum((res[t].reshape(len(x), -1).sum(1).astype(np.float64) for t in ts), np.zeros(len(x)))
        rows.append({"node": name, "op": nodes[name].op_type, "rule": rules[name].describe(),
                     "out": total(outs), "in": total(ins), "sink": sink(rules[name])})
    rows.reverse()  # graph order (input first)
    return rows


def sink(rule) -> str:
    """What can keep relevance from the node's inputs under `rule`: a linear rule's bias (bias handling "keep",
    graph_passes.lrp.BIAS_MODES) and stabiliser, or only the stabiliser; proportional splits lose only to theirs."""
    if rule.kind == "linear":
        if rule.bias == "zero":
            return "stabiliser (bias zeroed)"
        if rule.name == "zbox" or all(t.bias == "zero" for g in rule.groups for t in g.terms):
            return "stabiliser (no bias in the rule)"  # flat; z^B, whose bias terms cancel
        return "bias + stabiliser"
    return "stabiliser" if rule.kind in ("norm", "proportional") else "-"


def format_conservation(rows: list[dict], image: int = 0) -> list[str]:
    lines = ["node\top\trule\tsum R out\tsum R in\tin/out\tabsorbed\tby"]
    for r in rows:
        o, i = r["out"][image], r["in"][image]
        ratio = i / o if o else float("nan")
        lines.append(f"{r['node']}\t{r['op']}\t{r['rule']}\t{o:.6g}\t{i:.6g}\t{ratio:.6f}\t{o - i:.6g}\t"
                     f"{r.get('sink', '-')}")
    return lines
