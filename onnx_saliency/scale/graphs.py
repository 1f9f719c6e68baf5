"""Rewritten graphs built once on the driver and handed to every actor.

The engine asks its ``graph_source`` for a graph before building it (``Engine.session``). On the driver a
:class:`GraphRecorder` keeps every graph that a probe run of each method builds; the recorded bytes travel
to the actors once, through the object store, where :class:`ShippedGraphs` serves them. An actor builds a
graph itself only for a key the probe did not meet (counted, and reported in the run's summary). A persistent
cache of rewritten graphs is another ``graph_source``: where the actors share its folder, it can replace the
shipment (this module is that seam).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from ..errors import NumericalError


class GraphRecorder:
    """A graph source that builds nothing itself and keeps a copy of every graph the engine builds."""

    def __init__(self):
        self.graphs: dict[tuple, bytes] = {}

    def load(self, key):
        return None

    def save(self, key, data: bytes) -> None:
        self.graphs[key] = data


@dataclass
class ShippedGraphs:
    """The driver's graphs on an actor; `missed` counts the keys the actor had to build itself."""

    graphs: dict
    missed: list = field(default_factory=list)

    def load(self, key):
        data = self.graphs.get(key)
        if data is None:
            self.missed.append(key[0] if isinstance(key, tuple) and key else str(key))
        return data

    def save(self, key, data: bytes) -> None:
        pass


def probe_image(explainer) -> np.ndarray:
    """A fixed noise picture of the size the model takes (any size would do: graphs do not depend on it)."""
    pre = explainer.preprocessing
    h, w = explainer.model.input_hw
    side = pre.crop or pre.resize or 224
    shape = (h or side, w or side, 3)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def record_graphs(explainer, methods, layer, options: dict, batch_size: int = 1) -> dict[tuple, bytes]:
    """Run every method once on :func:`probe_image` through a throwaway Explainer over the same loaded model;
    return the rewritten graphs (serialized) that the runs built, by engine key.

    A method that cannot run on this model, or an option it refuses, fails here, on the driver, before any
    image is read. A NaN on the noise picture does not: the graphs were built before the values went bad.
    The throwaway's sessions are freed with it, so the driver keeps no session of its own.
    """
    from ..explainer import Explainer

    probe = Explainer.from_loaded(explainer.model, explainer.preprocessing, provider="cpu", threads=1)
    probe.engine.memory_budget = explainer.engine.memory_budget
    recorder = GraphRecorder()
    probe.engine.graph_source = recorder
    picture = probe_image(explainer)
    for method in methods:
        try:
            probe.explain([picture], method=method, layer=layer, target=None, batch_size=batch_size,
                          **copy.deepcopy(options))
        except NumericalError:
            pass
    return recorder.graphs
