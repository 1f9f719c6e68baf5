"""Method options, declared once: name, kind, range or choices, default, help.

Every Method lists its `Option`s in the class attribute `options`. The CLI (`--option KEY=VALUE`), the API
(`Explainer.explain(**options)`), `onnx-saliency methods` and the JSON sidecar all read that declaration:
`check_options` refuses unknown keys (naming the closest declared one) and bad values before any work, and
`bind` turns what was given into the declared types, so a method reads `req.option(name)` and never parses.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SaliencyError

KINDS = ("int", "float", "bool", "choice", "str", "names", "path", "array", "float-or-array")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option of a method. `low`/`high` bound int and float values (inclusive); `choices` lists the
    values of a "choice" (compared case-insensitively). "names": one tensor/node name or several (comma
    separated on the command line); "array": a numpy array, from the API only; "float-or-array": a number
    on the command line, a number or an array broadcastable to the input through the API."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: kind {self.kind!r} not one of {KINDS}")

    def describe(self) -> str:
        """'steps (int, 1..10000, default 20)': what `methods` prints."""
        if self.kind == "choice":
            what = " | ".join(self.choices)
        elif self.kind in ("int", "float") and (self.low is not None or self.high is not None):
            what = f"{self.kind} {_num(self.low) if self.low is not None else ''}..{_num(self.high) if self.high is not None else ''}"
        else:
            what = self.kind
        default = "none" if self.default is None else (
            ("1" if self.default else "0") if self.kind == "bool" else _num(self.default))
        return f"{self.name} ({what}; default {default})"

    def parse(self, value, owner: str):
        """The given value in this option's type, or a SaliencyError naming the option and what it takes."""
        if value is None:
            return None

        def bad(expected: str):
            shown = value if not isinstance(value, np.ndarray) else f"<array {value.shape}>"
            return SaliencyError(f"--option {self.name}={shown!r}: {owner} expects {expected}")

        if self.kind == "int":
            number = _number(value)
            if number is None or not math.isfinite(number) or number != int(number):
                raise bad(f"an integer{self._range()}")
            number = int(number)
            self._check_range(number, bad, "an integer")
            return number
        if self.kind == "float":
            number = _number(value)
            if number is None or not math.isfinite(number):
                raise bad(f"a finite number{self._range()}")
            self._check_range(number, bad, "a number")
            return float(number)
        if self.kind == "bool":
            text = str(int(value) if isinstance(value, (bool, np.bool_)) else value).strip().lower()
            if isinstance(value, float) and value in (0.0, 1.0):
                text = str(int(value))
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise bad("0 or 1 (true/false, yes/no)")
        if self.kind == "choice":
            text = str(value).strip().lower()
            if text not in self.choices:
                close = difflib.get_close_matches(text, self.choices, n=1)
                raise bad(f"one of {', '.join(self.choices)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            return text
        if self.kind in ("str", "path"):
            if self.name == "composite" and _is_composite(value):
                return value  # an lrp.Composite object given through the API: used as it is
            if isinstance(value, np.ndarray) or not str(value).strip():
                raise bad("a name" if self.kind == "str" else "a file path")
            return str(value).strip() if self.kind == "str" else str(value)
        if self.kind == "names":
            names = [value] if isinstance(value, str) else value
            try:
                names = [str(n).strip() for part in names for n in str(part).split(",")]
            except TypeError:
                raise bad("a tensor or node name, or several separated by commas") from None
            if not names or not all(names):
                raise bad("a tensor or node name, or several separated by commas")
            return names[0] if len(names) == 1 else names
        if self.kind == "array":
            if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.number):
                raise bad("a numeric array (through the Python API)")
            if not np.isfinite(value).all():
                raise bad("finite values")
            return value
        # float-or-array
        if isinstance(value, np.ndarray):
            if not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all():
                raise bad("a finite number or a finite numeric array")
            return value
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise bad("a finite number (or, through the Python API, an array broadcastable to the input)")
        return float(number)

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f" from {_num(self.low)} to {_num(self.high)}"
        if self.low is not None:
            return f" >= {_num(self.low)}"
        if self.high is not None:
            return f" <= {_num(self.high)}"
        return ""

    def _check_range(self, number, bad, what: str) -> None:
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise bad(what + self._range())


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _number(value) -> float | None:
    if isinstance(value, (bool, np.bool_)) or isinstance(value, np.ndarray) and value.ndim:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def check_options(methods, options: dict, flags: dict | None = None) -> None:
    """Refuse, before any work, a key that none of `methods` declares (naming the closest declared key) and
    any value a method that declares its key cannot take. `flags` maps keys that come from their own CLI
    flag (composite -> --composite) to that flag, for the message."""
    methods = list(methods)
    tables = [(m, m.declared_options(options)) for m in methods]
    known = sorted({name for _, table in tables for name in table})
    names = ", ".join(m.name for m in methods)
    for key in options:
        if any(key in table for _, table in tables):
            continue
        label = (flags or {}).get(key, f"--option {key}")
        lowered = {name.lower(): name for name in known}
        close = difflib.get_close_matches(str(key).lower(), list(lowered), n=1, cutoff=0.6)
        hint = f"; did you mean {lowered[close[0]]!r}?" if close else ""
        listing = (f" (options: {', '.join(known)})" if known else
                   f" ({names} {'takes' if len(methods) == 1 else 'take'} no options)")
        raise SaliencyError(f"{label}: not an option of {names}{hint}{listing}")
    for m, table in tables:
        for key, value in options.items():
            if key in table:
                table[key].parse(value, m.name)


def bind(table: dict[str, Option], options: dict, owner: str) -> dict:
    """`options` with the declared ones parsed to their types; keys declared elsewhere pass unchanged (they
    belong to another method of the same run, or to one wrapping this one)."""
    return {k: (table[k].parse(v, owner) if k in table else v) for k, v in options.items()}


def _is_composite(value) -> bool:
    from ..lrp.composites import Composite  # lrp does not import methods: no circle

    return isinstance(value, Composite)


# options several methods share
COMPOSITE = Option("composite", "str", None, "LRP composite name (onnx-saliency rules --help lists them); "
                   "through the API also an lrp.Composite")
RULE_MAP = Option("rule_map", "path", None, "LRP rule-map file (JSON or YAML) mapping nodes to rules")
LOW = Option("low", "float", None, "lowest input value for the z^B rule (default from the preprocessing)")
HIGH = Option("high", "float", None, "highest input value for the z^B rule (default from the preprocessing)")
LRP_INITS = ("logit", "one", "contrastive", "sglrp")
