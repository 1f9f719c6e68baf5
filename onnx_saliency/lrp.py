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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

import graph_passes as gp
from graph_passes import lrp as R

from .engine import check_finite
from .errors import SaliencyError, UnsupportedModelError

INITS = ("logit", "one", "contrastive", "sglrp")


# --- composites ---------------------------------------------------------------------------------------------

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


def uniform(rule: R.LRPRule, name: str | None = None, stabilizer: float = 1e-6) -> Composite:
    """The same rule on every linear layer (LRP-0, epsilon, z+ ...), base map elsewhere (Norm with
    `stabilizer`; 0 = exact proportional split, 0 where the sum is 0)."""
    return Composite(name or rule.name, ((ANY_LINEAR, rule),), stabilizer=stabilizer)


COMPOSITES = {
    "epsilon-plus-flat": epsilon_plus_flat, "epsilon-plus": epsilon_plus, "epsilon-gamma-box": epsilon_gamma_box,
    "epsilon-alpha2-beta1": epsilon_alpha2_beta1, "epsilon-alpha2-beta1-flat": epsilon_alpha2_beta1_flat,
    "excitation-backprop": excitation_backprop,
    "lrp0": lambda **k: uniform(R.LRP0(), "lrp0", stabilizer=0.0), "epsilon": lambda **k: uniform(R.Epsilon(), "epsilon"),
    "zplus": lambda **k: uniform(R.ZPlus(), "zplus"),
    "alpha1-beta0": lambda **k: uniform(R.AlphaBeta(1, 0), "alpha1-beta0"),
}


def composite_names() -> list[str]:
    return sorted(COMPOSITES)


def get_composite(name, low=None, high=None, **params) -> Composite:
    """A built-in composite by name (dashes or underscores; epsilon-gamma-box needs low/high)."""
    if isinstance(name, Composite):
        return name
    key = str(name).lower().replace("_", "-")
    if key not in COMPOSITES:
        raise SaliencyError(f"--composite {name!r}: unknown; known: {', '.join(composite_names())}")
    if key == "epsilon-gamma-box":
        if low is None or high is None:
            raise SaliencyError("--composite epsilon-gamma-box needs the input bounds (low, high)")
        return epsilon_gamma_box(low, high, **params)
    return COMPOSITES[key](**params)


def load_rule_map(path, low=None, high=None) -> Composite:
    """A composite from a JSON (or, if PyYAML is importable, YAML) file:

    {"extends": "epsilon-plus-flat",            # optional base composite
     "rules": [{"op": "Conv", "name": "conv1", "first": true, "rule": "zbox"},
               {"op": "dense", "rule": "epsilon", "eps": 0.25},
               {"op": "MaxPool", "rule": "proportional"}],
     "default": "epsilon"}                        # optional rule for linear layers nothing else matched
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SaliencyError(f"--rule-map {path}: cannot read ({err.strerror})") from err
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise SaliencyError(f"--rule-map {path}: YAML needs PyYAML; use a .json rule map") from err
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SaliencyError(f"--rule-map {path}: invalid JSON ({err.msg} at line {err.lineno})") from err
    return parse_rule_map(data, low, high, where=f"--rule-map {path}")


def _rule_from_spec(spec, low, high, where) -> R.LRPRule:
    if isinstance(spec, str):
        spec = {"rule": spec}
    params = {k: v for k, v in spec.items() if k not in ("op", "name", "first", "last", "rule")}
    params.setdefault("low", low)
    params.setdefault("high", high)
    try:
        return R.make_rule(str(spec["rule"]), **params)
    except (KeyError, ValueError, TypeError) as err:
        raise SaliencyError(f"{where}: bad rule {spec!r} ({err})") from err


def parse_rule_map(data, low=None, high=None, where="rule map") -> Composite:
    if not isinstance(data, dict) or not isinstance(data.get("rules", []), list):
        raise SaliencyError(f"{where}: expected an object with a 'rules' list")
    unknown = set(data) - {"rules", "default", "extends", "name", "stabilizer"}
    if unknown:
        raise SaliencyError(f"{where}: unknown keys {sorted(unknown)}")
    entries = []
    for i, item in enumerate(data.get("rules", [])):
        if not isinstance(item, dict) or "rule" not in item:
            raise SaliencyError(f"{where}: rules[{i}] needs a 'rule'")
        op = item.get("op")
        ops = None if op is None else tuple([op] if isinstance(op, str) else op)
        if item.get("name") is not None:
            try:
                re.compile(item["name"])
            except re.error as err:
                raise SaliencyError(f"{where}: rules[{i}] bad name pattern ({err})") from err
        entries.append((Match(ops, item.get("name"), item.get("first"), item.get("last")),
                        _rule_from_spec(item, low, high, where)))
    if data.get("default") is not None:
        entries.append((ANY_LINEAR, _rule_from_spec(data["default"], low, high, where)))
    name = data.get("name", "custom")
    if data.get("extends"):
        base = get_composite(data["extends"], low=low, high=high)
        return base.with_entries(entries, name)
    return Composite(name, tuple(entries), stabilizer=float(data.get("stabilizer", 1e-6)))


def resolve_composite(engine, composite=None, rule_map=None, low=None, high=None) -> Composite:
    """Composite from a name / object / rule-map file, with z^B bounds from the model's preprocessing."""
    needs_bounds = rule_map is not None or str(composite).lower().replace("_", "-") == "epsilon-gamma-box"
    if needs_bounds and (low is None or high is None):
        from .preprocess import input_bounds

        low, high = input_bounds(engine.model.preprocessing())
    if rule_map:
        return load_rule_map(rule_map, low, high)
    return get_composite(composite or "epsilon-plus-flat", low=low, high=high)


# --- initial relevance and the relevance graph --------------------------------------------------------------

def append_initial_relevance(model: onnx.ModelProto, scores: str, init: str, classes: int) -> tuple:
    """Add the initial relevance tensor (from gp.SEED, the in-graph one-hot) -> (model, its name)."""
    if init not in INITS:
        raise SaliencyError(f"--init {init!r}: expected one of {', '.join(INITS)}")
    if init == "one":
        return model, gp.SEED
    g = model.graph
    out = f"lrp_init/{init}"

    def c(name, value):
        g.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    if init == "logit":
        g.node.append(helper.make_node("Mul", [gp.SEED, scores], [out], name="lrp_init/mul"))
    elif init == "contrastive":
        # target 1, every other class -1/C  (Relevance-CAM's CLRP)
        g.node.extend([
            helper.make_node("Mul", [gp.SEED, c("lrp_init/scale", 1.0 + 1.0 / classes)], ["lrp_init/a"],
                             name="lrp_init/mul"),
            helper.make_node("Sub", ["lrp_init/a", c("lrp_init/shift", 1.0 / classes)], [out], name="lrp_init/sub")])
    else:  # sglrp: y_c * (onehot - y)
        g.node.extend([
            helper.make_node("Softmax", [scores], ["lrp_init/y"], axis=1, name="lrp_init/softmax"),
            helper.make_node("Mul", ["lrp_init/y", gp.SEED], ["lrp_init/yt"], name="lrp_init/mul"),
            helper.make_node("ReduceSum", ["lrp_init/yt", c_int(g, "lrp_init/axis", [1])], ["lrp_init/yc"],
                             keepdims=1, name="lrp_init/sum"),
            helper.make_node("Sub", [gp.SEED, "lrp_init/y"], ["lrp_init/d"], name="lrp_init/sub"),
            helper.make_node("Mul", ["lrp_init/yc", "lrp_init/d"], [out], name="lrp_init/mul2")])
    return model, out


def c_int(g, name, value):
    g.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, np.int64), name))
    return name


def build_relevance_graph(canonical: onnx.ModelProto, score: str, classes: int, at, composite: Composite,
                          init: str = "logit", expose=(), record: list | None = None) -> onnx.ModelProto:
    analysis = R.analyze(canonical)
    rules = composite.assign(canonical, analysis)
    m = gp.expose_tensors(canonical, sorted(set(expose) | {score}))
    m = gp.append_target_seed(m, score)
    m, seed = append_initial_relevance(m, score, init, classes)
    try:
        return R.append_lrp(m, score, list(at), seed=seed, rules=rules, analysis=analysis, record=record)
    except gp.UnsupportedOpsError as err:
        listed = ", ".join(f"{n} ({op})" for n, op in err.nodes)
        raise UnsupportedModelError(f"LRP composite {composite.name}: no relevance rule for {len(err.nodes)} "
                                    f"node(s): {listed}") from err
    except gp.GraphPassError as err:
        raise UnsupportedModelError(f"LRP composite {composite.name}: {err}") from err


def relevance_at(engine, x: np.ndarray, targets=None, at=None, composite="epsilon-plus-flat", init: str = "logit",
                 batch_size: int = 32, rule_map=None, expose=(), low=None, high=None) -> dict:
    """Relevance at tensors `at` (default: the image input) for a batch with per-image targets (-1 = top-1).

    One onnxruntime call per batch gives logits, exposed activations and relevance. Returns
    {"relevance": {tensor: (N, ...) array}, "scores": (N, classes), "targets": (N,), "target_score": (N,),
     "start": (N,) total initial relevance, "composite": name, plus exposed tensors by name}.
    """
    model = engine.model
    comp = composite if isinstance(composite, Composite) else resolve_composite(engine, composite, rule_map,
                                                                                low, high)
    at = tuple(at) if at else (model.input_name,)
    expose = tuple(expose)
    score = model.score_tensor

    def build(canonical):
        return build_relevance_graph(canonical, score, model.num_classes, at, comp, init, expose)

    sess, names, _ = engine.session(("lrp", comp, at, init, expose), build)
    wanted = [score, gp.RESOLVED, gp.TARGET_SCORE] + [gp.grad_name(t) for t in at] + [
        t for t in expose if t != score]
    return _run(engine, sess, wanted, x, targets, batch_size, comp, at, init)


def _run(engine, sess, wanted, x, targets, batch_size, comp, at, init, extra_keys=()):
    model = engine.model
    arrays = engine.run_session(sess, wanted, x, targets, batch_size=batch_size,
                                where=f"{model.path.name} (LRP {comp.name})")
    score = model.score_tensor
    scores = arrays[score]
    tc = arrays[gp.RESOLVED]
    out = {"relevance": {t: arrays[gp.grad_name(t)] for t in at}, "scores": scores, "targets": tc,
           "target_score": arrays[gp.TARGET_SCORE], "start": initial_total(scores, tc, init),
           "composite": comp.name}
    for k in wanted:
        if k not in (score, gp.RESOLVED, gp.TARGET_SCORE) and k not in {gp.grad_name(t) for t in at}:
            out[k] = arrays[k]
    return out


def initial_total(scores: np.ndarray, targets: np.ndarray, init: str) -> np.ndarray:
    """Sum of the initial relevance per image (what conservation compares against)."""
    n, c = scores.shape
    onehot = np.zeros_like(scores)
    onehot[np.arange(n), targets] = 1
    if init == "logit":
        r = onehot * scores
    elif init == "one":
        r = onehot
    elif init == "contrastive":
        r = onehot * (1 + 1 / c) - 1 / c
    else:
        e = np.exp(scores - scores.max(1, keepdims=True))
        y = e / e.sum(1, keepdims=True)
        r = (y * onehot).sum(1, keepdims=True) * (onehot - y)
    return r.sum(axis=1).astype(np.float64)


# --- reports ------------------------------------------------------------------------------------------------

def rule_report(model, composite) -> list[str]:
    """Lines: every node's rule, BatchNorms folded (into what) or kept, residual Adds, nodes with no rule.
    `model` is a LoadedModel (or a canonical ModelProto); `composite` a Composite."""
    canonical = getattr(model, "canonical", model)
    report = getattr(model, "report", None)
    a = R.analyze(canonical)
    rules = composite.assign(canonical, a)
    score = getattr(model, "score_tensor", canonical.graph.output[0].name)
    from graph_passes._graph import ancestors

    needed = ancestors(canonical.graph, [score])
    lines = [f"composite {composite.name}"]
    missing = []
    for node in canonical.graph.node:
        if not any(o in needed for o in node.output) or not any(i in a.activations for i in node.input):
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
        desc = rule.describe() if rule else "NO RULE"
        lines.append(f"{node.name}\t{node.op_type}\t{desc}" + (f"\t[{'; '.join(tags)}]" if tags else ""))
    if report is not None:
        lines += [f"BatchNormalization {bn} folded into {into}" for bn, into in report.folded_bn]
        lines += [f"BatchNormalization {bn} kept (no foldable producer)" for bn in report.kept_bn]
    lines.append(f"residual adds: {len(a.residual)}")
    if missing:
        lines.append(f"nodes without a rule ({len(missing)}): " + ", ".join(f"{n.name} ({n.op_type})" for n in missing))
    else:
        lines.append("nodes without a rule: none")
    return lines


def conservation_table(engine, x: np.ndarray, targets=None, composite="epsilon-plus-flat", init: str = "logit",
                       rule_map=None, low=None, high=None) -> list[dict]:
    """Per node on the path: sum of relevance arriving (out) and leaving towards its inputs (in), per image.

    Debug path: every node's relevance is an extra graph output (slower, more memory). Rows:
    {"node", "op", "rule", "out": (N,), "in": (N,)}; a ratio in/out < 1 shows absorption (bias, epsilon).
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
    res = _run(engine, sess, [score, gp.RESOLVED, gp.TARGET_SCORE, gp.grad_name(model.input_name)] + tensors,
               x, targets, 32, comp, (model.input_name,), init)
    rules = comp.assign(model.canonical)
    nodes = {n.name: n for n in model.canonical.graph.node}
    rows = []
    for name, outs, ins in record:
        def total(ts):
            return sum((res[t].reshape(len(x), -1).sum(1).astype(np.float64) for t in ts), np.zeros(len(x)))
        rows.append({"node": name, "op": nodes[name].op_type, "rule": rules[name].describe(),
                     "out": total(outs), "in": total(ins)})
    rows.reverse()  # graph order (input first)
    return rows


def format_conservation(rows: list[dict], image: int = 0) -> list[str]:
    lines = ["node\top\trule\tsum R out\tsum R in\tin/out"]
    for r in rows:
        o, i = r["out"][image], r["in"][image]
        ratio = i / o if o else float("nan")
        lines.append(f"{r['node']}\t{r['op']}\t{r['rule']}\t{o:.6g}\t{i:.6g}\t{ratio:.6f}")
    return lines


__all__ = ["Match", "Composite", "get_composite", "composite_names", "load_rule_map", "parse_rule_map",
           "resolve_composite", "relevance_at", "rule_report", "conservation_table", "format_conservation",
           "initial_total", "INITS", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1",
           "epsilon_alpha2_beta1_flat", "excitation_backprop", "uniform"]
