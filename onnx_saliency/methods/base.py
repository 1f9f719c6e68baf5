"""What every method receives and returns."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import numpy as np

from ..engine import Engine
from .options import Option, bind

_UNSET = object()


@dataclass
class Request:
    """One method applied to one preprocessed batch."""

    engine: Engine
    x: np.ndarray                 # (N, C, H, W) float32, canonical layout
    targets: np.ndarray           # (N,) int64, -1 = top-1
    layers: list[str]             # resolved tensor names (CAM methods); may be empty for pixel methods
    options: dict = field(default_factory=dict)
    batch_size: int = 32
    declared: dict = field(default_factory=dict)  # name -> Option of the method explaining (set on entry)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.x.shape[2]), int(self.x.shape[3])

    def option(self, name, default=_UNSET):
        """The option's value: as given (parsed to its declared type), else `default` where the call site
        passes one (a default that depends on other options, such as reference=true), else the declared
        default."""
        value = self.options.get(name)
        opt = self.declared.get(name)
        if value is not None:
            return opt.parse(value, "this method") if opt is not None else value
        if default is not _UNSET:
            return default
        return opt.default if opt is not None else None


@dataclass
class Result:
    method: str
    maps: np.ndarray                      # (N, H, W) float32 at input resolution
    targets: np.ndarray                   # (N,) resolved classes
    scores: np.ndarray                    # (N,) the explained score (pre-softmax)
    layers: list[str] = field(default_factory=list)
    raw: np.ndarray | None = None         # layer-resolution map (N, h, w) where one exists
    attributions: np.ndarray | None = None  # pixel attributions (N, C, H, W) where they exist
    signed: bool = False                  # maps carry sign (LRP, gradient x input): diverging colours
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Method:
    """A recipe over activations, gradients or relevance. Subclasses set `name`, declare their `options`
    and implement explain(); every explain() receives the request with its options parsed and checked
    against the declaration (`bind`), whoever calls it (the CLI, the API, evaluation, audit, a wrapper)."""

    name = ""
    uses_layer = True
    options: tuple[Option, ...] = ()

    def declared_options(self, given: dict | None = None) -> dict[str, Option]:
        """name -> Option; `given` (the options passed) matters where one option picks others (a base method)."""
        return {o.name: o for o in self.options}

    def bind(self, req: Request) -> Request:
        table = self.declared_options(req.options)
        return replace(req, options=bind(table, req.options, self.name), declared=table)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        raw = cls.__dict__.get("explain")
        if raw is not None and not getattr(raw, "_binds", False):
            @functools.wraps(raw)
            def explain(self, req, _raw=raw):
                return _raw(self, self.bind(req))

            explain._binds = True
            cls.explain = explain

    def explain(self, req: Request) -> Result:  # pragma: no cover - interface
        raise NotImplementedError
