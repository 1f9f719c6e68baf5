"""What every method receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..engine import Engine


@dataclass
class Request:
    """One method applied to one preprocessed batch."""

    engine: Engine
    x: np.ndarray                 # (N, C, H, W) float32, canonical layout
    targets: np.ndarray           # (N,) int64, -1 = top-1
    layers: list[str]             # resolved tensor names (CAM methods); may be empty for pixel methods
    options: dict = field(default_factory=dict)
    batch_size: int = 32

    @property
    def size(self) -> tuple[int, int]:
        return int(self.x.shape[2]), int(self.x.shape[3])

    def option(self, name, default):
        value = self.options.get(name)
        return default if value is None else value


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
    """A recipe over activations, gradients or relevance. Subclasses set `name` and implement explain()."""

    name = ""
    uses_layer = True

    def explain(self, req: Request) -> Result:  # pragma: no cover - interface
        raise NotImplementedError
