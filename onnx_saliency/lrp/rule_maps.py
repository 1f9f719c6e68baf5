"""Rule-map files (JSON or YAML): user entries on top of a built-in composite, and the composite of a run."""

from __future__ import annotations

import re
from pathlib import Path

from graph_passes import lrp as R

from ..errors import SaliencyError
from .composites import ANY_LINEAR, Composite, Match, get_composite

def load_rule_map(path, low=None, high=None) -> Composite:
    """A composite from a JSON (or, if PyYAML is importable, YAML) file:

    {"extends": "epsilon-plus-flat",            # optional base composite
     "rules": [{"op": "Conv", "name": "conv1", "first": true, "rule": "zbox"},
               {"op": "dense", "rule": "epsilon", "eps": 0.25},
               {"op": "MaxPool", "rule": "proportional"}],
     "default": "epsilon"}                        # optional rule for linear layers nothing else matched
    """
    from ..intake.side_files import parse_json, read_text

    path = Path(path)
    text = read_text(path, "--rule-map")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise SaliencyError(f"--rule-map {path}: YAML needs PyYAML; use a .json rule map") from err
        try:
            data = yaml.safe_load(text)
        except RecursionError:
            raise SaliencyError(f"--rule-map {path}: YAML nested too deeply") from None
        except yaml.YAMLError as err:
            raise SaliencyError(f"--rule-map {path}: invalid YAML ({' '.join(str(err).split())})") from None
    else:
        data = parse_json(text, path, "--rule-map")
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
    needs_bounds = rule_map is not None or str(composite).lower().replace("_", "-") in (
        "epsilon-gamma-box", "epsilon-gamma-box-nobias")
    if needs_bounds and (low is None or high is None):
        from ..intake.preprocess import input_bounds

        low, high = input_bounds(engine.model.preprocessing())
    if rule_map:
        return load_rule_map(rule_map, low, high)
    return get_composite(composite or "epsilon-plus-flat", low=low, high=high)


