"""Gradual Extrapolation (Szandala 2021): sharpen any coarse map with the activations of the down-sampling
layers below it. A modifier: `-m gradcam+ge`, `-m cmwp+ge`, or `-m gradual-extrapolation --option base=...`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from graph_passes._graph import ancestors, attrs, tensor_infos

from ..errors import SaliencyError
from ..output.postprocess import resize_maps
from .base import Method, Request, Result
from .options import Option

VARIANTS = ("original", "upsample")
COMBINES = ("sum", "max", "mean", "none")
INPUT_FACTORS = ("raw", "abs", "skip")
SCOPES = ("layer", "all")


def downsampling_excitations(model, tensors, scope: str = "layer") -> list[str]:
    """Forward-ordered excitations: the input of the first down-sampling node, then the output of every
    MaxPool and strided Conv / AveragePool. scope "layer": only nodes the given tensors depend on;
    "all": every such node the scores depend on (the reference's first version, e.g. VGG pool5)."""
    g = model.canonical.graph
    infos = tensor_infos(model.canonical)
    needed = ancestors(g, [model.score_tensor] if scope == "all" else list(tensors))
    nodes = []
    for node in g.node:
        out = node.output[0]
        if out not in needed:
            continue
        info = infos.get(out)
        if info is not None and info.shape is not None and len(info.shape) != 4:
            continue
        strided = any(s > 1 for s in attrs(node).get("strides", [1]))
        if node.op_type == "MaxPool" or (node.op_type in ("Conv", "AveragePool") and strided):
            nodes.append(node)
    if not nodes:
        return []
    return [nodes[0].input[0]] + [n.output[0] for n in nodes]


def _factor(e: np.ndarray, combine: str) -> np.ndarray:
    """Per-image excitation factor (N, h, w); divided by max |e| as the reference divides by max(e), a
    positive scale that keeps the products in range (the z-score removes it)."""
    f = {"sum": e.sum(axis=1), "max": e.max(axis=1), "mean": e.mean(axis=1)}[combine]
    peak = np.abs(e).reshape(len(e), -1).max(axis=1)
    return f / np.where(peak > 0, peak, 1.0)[:, None, None]


def normalise(maps: np.ndarray) -> np.ndarray:
    """Per-image z-score, clip to [-1, 1], min-max to [0, 1]; constant maps become 0."""
    out = np.zeros(maps.shape, np.float32)
    for i, m in enumerate(maps.astype(np.float64)):
        sd = m.std()
        if not np.isfinite(sd) or sd == 0:
            continue
        z = np.clip((m - m.mean()) / sd, -1, 1)
        span = z.max() - z.min()
        if span > 0:
            out[i] = (z - z.min()) / span
    return out


def extrapolate(base: np.ndarray, excitations: list[np.ndarray], size: tuple[int, int], variant: str = "original",
                combine: str = "sum", input_factor: str = "raw") -> np.ndarray:
    """(N, h, w) coarse maps -> (N, H, W) in [0, 1].

    `excitations` are (N, C, h_i, w_i) arrays in forward order, the first being the input of the first
    down-sampling node. Deepest first: resize the map to each excitation's size and multiply by its
    channel sum (combine). variant "upsample" (the 2023 revision) skips excitations not wider than the
    current map. The result is resized to `size`, then z-scored, clipped and min-maxed per image.
    """
    H = np.nan_to_num(np.asarray(base, np.float32))
    for i in range(len(excitations) - 1, -1, -1):
        e = np.asarray(excitations[i], np.float32)
        if combine == "none" or (i == 0 and input_factor == "skip"):
            continue
        if variant == "upsample" and e.shape[-1] <= H.shape[-1]:
            continue
        H = resize_maps(H, e.shape[-2:])
        H = H * _factor(np.abs(e) if i == 0 and input_factor == "abs" else e, combine)
        peak = np.abs(H).reshape(len(H), -1).max(axis=1)
        H = H / np.where(peak > 0, peak, 1.0)[:, None, None]  # many products would overflow float32
    return normalise(resize_maps(H, size))


class _SharedForward:
    """Engine stand-in handed to the base method: its first full run over the batch also returns the
    excitations, so GE costs no extra forward. Methods that build their own graph ask `ge_wanted(x)` and
    hand the arrays back with `ge_deliver` (see extra_exposures / hand_over)."""

    def __init__(self, engine, x: np.ndarray, tensors: list[str]):
        self._engine, self._x, self._tensors = engine, x, tuple(tensors)
        self.captured: dict | None = None if tensors else {}

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @property
    def calls(self):
        return self._engine.calls

    @calls.setter
    def calls(self, value):
        self._engine.calls = value

    def run(self, x, targets=None, *, expose=(), outputs=None, **kw):
        if self.captured is None and x is self._x and outputs is None:
            out = self._engine.run(x, targets, expose=tuple(dict.fromkeys([*expose, *self._tensors])), **kw)
            self.captured = {t: out[t] for t in self._tensors}
            return out
        return self._engine.run(x, targets, expose=expose, outputs=outputs, **kw)

    def ge_wanted(self, x) -> tuple:
        return self._tensors if self.captured is None and x is self._x else ()

    def ge_deliver(self, arrays: dict) -> None:
        if self.captured is None and arrays:
            self.captured = dict(arrays)


def extra_exposures(engine, x) -> tuple:
    """Tensors a method building its own graph should also expose for a Gradual Extrapolation wrapper."""
    wanted = getattr(engine, "ge_wanted", None)
    return tuple(wanted(x)) if wanted is not None else ()


def hand_over(engine, arrays: dict) -> None:
    deliver = getattr(engine, "ge_deliver", None)
    if deliver is not None:
        deliver(arrays)


class GradualExtrapolation(Method):
    """Gradual Extrapolation of a base map (default Grad-CAM) by the down-sampling activations below it.

    Excitations as the reference: the input of the first down-sampling node, then every MaxPool and strided
    Conv / AveragePool output, found in the graph. Deepest first, the map is resized (bilinear, half-pixel)
    to each and multiplied by its channel sum / max|e|; then z-score, clip to [-1, 1], min-max to [0, 1].
    They come out of the base method's own onnxruntime call where it runs through the engine (one extra
    forward otherwise).

    Options: base (method name, for -m gradual-extrapolation), ge_variant (original | upsample: the 2023
    revision, only ever upsampling), ge_combine (sum | max | mean (TorchPRISM) | none), ge_input (raw | abs
    | skip: the shallowest excitation, the normalised image on strided-stem nets, whose signed channel sum
    flips dark regions), ge_scope (layer: nodes below the base layer | all: every down-sampling node, as
    the first version, which also down-samples by e.g. VGG's pool5 after a conv5_3 map).

    Deviations: z-score, min-max and max(e) are per image (the reference normalises over the whole batch);
    the revision's "first strided conv per container" has no ONNX counterpart, so every strided conv counts.
    """

    name = "gradual-extrapolation"
    uses_layer = True
    options = (Option("base", "str", "gradcam", "the method whose map is extrapolated (-m gradual-extrapolation)"),
               Option("ge_variant", "choice", "original", "original, or upsample (the 2023 revision)",
                      choices=VARIANTS),
               Option("ge_combine", "choice", "sum", "how an excitation's channels combine", choices=COMBINES),
               Option("ge_input", "choice", "raw", "the shallowest excitation: raw, abs or skip",
                      choices=INPUT_FACTORS),
               Option("ge_scope", "choice", "layer", "layer: nodes below the base layer; all: every "
                      "down-sampling node", choices=SCOPES))

    def declared_options(self, given=None):
        """Its own options and its base method's (`base` only where the base is chosen by option)."""
        from . import get_method

        own = {o.name: o for o in self.options if not (self.base is not None and o.name == "base")}
        base = self.base
        if base is None:
            name = str((given or {}).get("base") or "gradcam")
            base = get_method(name)
            if isinstance(base, GradualExtrapolation):
                raise SaliencyError(f"-m {self.name}: the base method cannot itself be gradual extrapolation")
        return {**base.declared_options(given), **own}

    def __init__(self, base: Method | None = None):
        self.base = base
        if base is not None:
            self.name = f"{base.name}+ge"
            self.uses_layer = base.uses_layer

    def _options(self, req: Request) -> dict:
        opts = {"ge_variant": str(req.option("ge_variant", "original")),
                "ge_combine": str(req.option("ge_combine", "sum")),
                "ge_input": str(req.option("ge_input", "raw")), "ge_scope": str(req.option("ge_scope", "layer"))}
        for key, allowed in (("ge_variant", VARIANTS), ("ge_combine", COMBINES), ("ge_input", INPUT_FACTORS),
                             ("ge_scope", SCOPES)):
            if opts[key] not in allowed:
                raise SaliencyError(f"--option {key}={opts[key]!r}: expected one of {', '.join(allowed)}")
        return opts

    def explain(self, req: Request) -> Result:
        from . import get_method

        base = self.base or get_method(str(req.option("base", "gradcam")))
        if isinstance(base, GradualExtrapolation):
            raise SaliencyError(f"-m {self.name}: the base method cannot itself be gradual extrapolation")
        opts = self._options(req)
        model = req.engine.model
        layers = req.layers if base.uses_layer and req.layers else [model.score_tensor]
        names = downsampling_excitations(model, layers, opts["ge_scope"])
        inner = [t for t in dict.fromkeys(names) if t != model.input_name]
        shared = _SharedForward(req.engine, req.x, inner)
        result = base.explain(replace(req, engine=shared))
        captured = shared.captured
        if captured is None:
            captured = req.engine.run(req.x, req.targets, expose=inner, outputs=inner, batch_size=req.batch_size)
        arrays = [req.x if t == model.input_name else captured[t] for t in names]
        coarse = result.raw if result.raw is not None else result.maps
        maps = extrapolate(coarse, [a for a in arrays if a.ndim == 4], req.size, opts["ge_variant"],
                           opts["ge_combine"], opts["ge_input"])
        used = ", ".join(f"{t} {a.shape[2]}x{a.shape[3]}" for t, a in zip(names, arrays) if a.ndim == 4)
        note = (f"gradual extrapolation of {base.name} ({opts['ge_variant']}, {opts['ge_combine']}): "
                f"{used or 'no down-sampling layers found; map only normalised'}")
        return Result(self.name, maps, result.targets, result.scores, layers=result.layers, raw=coarse,
                      options={**result.options, **opts, "base": base.name}, notes=list(result.notes) + [note])
