"""Gradual Extrapolation (Szandala 2021): sharpen any coarse map with the activations of the down-sampling
layers below it. A modifier: `-m gradcam+ge`, `-m cmwp+ge`, or `-m gradual-extrapolation --option base=...`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from graph_passes._graph import attrs, const_value, consumers, execution_order, tensor_infos

from ..errors import SaliencyError
from ..intake.layers import refuse_transformer
from ..output.postprocess import resize_maps
from .base import Method, Request, Result
from .options import Option

VARIANTS = ("original", "upsample")
COMBINES = ("sum", "max", "mean", "none")
INPUT_FACTORS = ("auto", "raw", "abs", "skip")
SCOPES = ("layer", "all")
EXCITATIONS = ("activation", "output")
NORMALISATIONS = ("minmax", "zscore-clip")
REFERENCES = ("false", "true", "v1", "v2")
# a pointwise op after which an excitation is non-negative (Clip counts when its lower bound is >= 0)
_RECTIFIERS = ("Relu", "Clip")

# reference=v1: szandala/gradual-extrapolation 3c09801 (the paper's code); v2: the 2023 revision in
# szandala/Latent-Features-Detection 12329ad, which only ever upsamples. Both hook every nn.MaxPool2d and every
# strided nn.Conv2d of the whole model (output as the hook sees it: before any BatchNorm), multiply by the
# signed channel sum of the normalised image, and normalise by z-score (torch's unbiased std), clip, min-max.
REFERENCE_OPTIONS = {
    "v1": {"ge_variant": "original", "ge_combine": "sum", "ge_input": "raw", "ge_scope": "all",
           "ge_excitation": "output", "ge_normalise": "zscore-clip"},
    "v2": {"ge_variant": "upsample", "ge_combine": "sum", "ge_input": "raw", "ge_scope": "all",
           "ge_excitation": "output", "ge_normalise": "zscore-clip"},
}
REFERENCE_OPTIONS["true"] = REFERENCE_OPTIONS["v1"]
DEFAULTS = {"ge_variant": "original", "ge_combine": "sum", "ge_input": "auto", "ge_scope": "layer",
            "ge_excitation": "activation", "ge_normalise": "minmax"}


def downsampling_excitations(model, tensors, scope: str = "layer", pooling=("MaxPool", "AveragePool")) -> list[str]:
    """Excitations in execution order: the input of the first down-sampling node, then the output of every
    MaxPool and strided Conv / AveragePool (`pooling` names the pools that count). scope "layer": only nodes
    the given tensors depend on; "all": every such node the scores depend on (the reference, e.g. VGG pool5).

    The order is the data flow's (graph_passes._graph.execution_order), never the node listing: the reference
    hooks modules as they run, and where two branches down-sample to one size (a ResNet block's strided conv
    and its shortcut conv) `ge_variant=upsample` keeps the one that ran last."""
    g = model.canonical.graph
    infos = tensor_infos(model.canonical)
    roots = [model.score_tensor] if scope == "all" else list(tensors)
    nodes = []
    for node in execution_order(g, roots):
        out = node.output[0]
        info = infos.get(out)
        if info is not None and info.shape is not None and len(info.shape) != 4:
            continue
        strided = any(s > 1 for s in attrs(node).get("strides", [1]))
        if (node.op_type == "MaxPool" and "MaxPool" in pooling) or (
                strided and (node.op_type == "Conv" or (node.op_type == "AveragePool" and "AveragePool" in pooling))):
            nodes.append(node)
    if not nodes:
        return []
    return [nodes[0].input[0]] + [n.output[0] for n in nodes]


def _rectifier_after(graph, tensor: str, cons) -> str | None:
    """The output of the rectifier that takes `tensor` (directly, or through the residual Add it feeds),
    where that is its only consumer: the excitation as the next layer sees it, non-negative."""
    def sole(t):
        c = cons.get(t, [])
        return c[0] if len(c) == 1 else None

    node = sole(tensor)
    if node is not None and node.op_type == "Add":
        node = sole(node.output[0])
    if node is None or node.op_type not in _RECTIFIERS:
        return None
    if node.op_type == "Clip":
        low = const_value(graph, node.input[1]) if len(node.input) > 1 and node.input[1] else None
        low = attrs(node).get("min") if low is None else float(np.asarray(low).ravel()[0])
        if low is None or low < 0:
            return None
    return node.output[0]


def activated(model, names: list[str]) -> tuple[list[str], list[str]]:
    """Each down-sampling output replaced by the rectified activation after it where there is one (the
    first name, the input of the first down-sampling node, is kept); also the names left signed."""
    g = model.canonical.graph
    cons = consumers(g)
    out, signed = names[:1], []
    for t in names[1:]:
        act = _rectifier_after(g, t, cons)
        out.append(act or t)
        if act is None:
            signed.append(t)
    return out, signed


def pre_batchnorm(model, tensor: str, array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The output of the conv that produces `tensor` before the BatchNorm canonicalisation folded into it
    (what a forward hook on the torch Conv2d records): y = (y_folded - beta) / s + mean, s = gamma/sqrt(var+eps).
    Returns the array unchanged (and None) where no BN was folded into that conv."""
    g = model.canonical.graph
    node = next((n for n in g.node if tensor in n.output), None)
    bn_name = next((bn for bn, into in model.report.folded_bn if node is not None and into == node.name), None)
    if bn_name is None:
        return array, None
    og = model.original.graph
    bn = next(n for n in og.node if n.name == bn_name)
    gamma, beta, mean, var = (np.asarray(const_value(og, t), np.float64) for t in bn.input[1:5])
    scale = gamma / np.sqrt(var + attrs(bn).get("epsilon", 1e-5))
    if np.any(scale == 0):
        raise SaliencyError(f"--option reference: BatchNormalization {bn_name} has zero scales, so the output "
                            f"of the conv before it cannot be recovered from the folded graph")
    shape = (1, -1, 1, 1)
    pre = (array.astype(np.float64) - beta.reshape(shape)) / scale.reshape(shape) + mean.reshape(shape)
    return pre.astype(np.float32), bn_name


def _factor(e: np.ndarray, combine: str, peak_of=None) -> np.ndarray:
    """Per-image excitation factor (N, h, w), divided by max e as the reference does (max |e| where the
    maximum is not positive, a positive scale that keeps the products in range; normalisation removes it)."""
    f = {"sum": e.sum(axis=1), "max": e.max(axis=1), "mean": e.mean(axis=1)}[combine]
    peak = e.reshape(len(e), -1).max(axis=1)
    peak = np.where(peak > 0, peak, np.abs(e).reshape(len(e), -1).max(axis=1))
    return f / np.where(peak > 0, peak, 1.0)[:, None, None]


def normalise(maps: np.ndarray, how: str = "zscore-clip", ddof: int = 0) -> np.ndarray:
    """Per image to [0, 1]. "zscore-clip" (the reference): z-score, clip to [-1, 1], min-max; "minmax":
    min-max only, which keeps the map's peak (the clip turns everything above one standard deviation into a
    plateau of ones). Constant maps become 0."""
    out = np.zeros(maps.shape, np.float32)
    for i, m in enumerate(maps.astype(np.float64)):
        if how == "zscore-clip":
            sd = m.std(ddof=ddof)
            if not np.isfinite(sd) or sd == 0:
                continue
            m = np.clip((m - m.mean()) / sd, -1, 1)
        span = m.max() - m.min()
        if np.isfinite(span) and span > 0:
            out[i] = (m - m.min()) / span
    return out


def extrapolate(base: np.ndarray, excitations: list[np.ndarray], size: tuple[int, int], variant: str = "original",
                combine: str = "sum", input_factor: str = "raw", normalisation: str = "zscore-clip",
                ddof: int = 0) -> np.ndarray:
    """(N, h, w) coarse maps -> (N, H, W) in [0, 1].

    `excitations` are (N, C, h_i, w_i) arrays in forward order, the first being the input of the first
    down-sampling node. Deepest first: resize the map to each excitation's size and multiply by its
    channel sum (combine) / max. variant "upsample" (the 2023 revision) skips excitations not wider than the
    current map. The result is resized to `size` and normalised per image (`normalise`).
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
    return normalise(resize_maps(H, size), normalisation, ddof)


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

    Excitations: the input of the first down-sampling node, then every MaxPool and strided Conv /
    AveragePool output, found in the graph, in execution order. Deepest first, the map is resized (bilinear,
    half-pixel) to each and multiplied by its channel sum / max e; then normalised to [0, 1]. They come out of
    the base method's own onnxruntime call where it runs through the engine (one extra forward otherwise).

    Defaults (chosen by benchmarks/ge_defaults.py on EfficientNet-Lite0 and the shared photos, results in
    docs/ge_defaults.md): each strided conv's excitation is the rectified activation after it
    (ge_excitation=activation; a signed conv output flips the map wherever its channel sum is negative), the
    normalised image is not a factor (ge_input=auto skips the first excitation when it is the model input and
    keeps it when it is a hidden activation, VGG's relu1_2) and the map is min-max normalised
    (ge_normalise=minmax; the reference's clip at one standard deviation makes a plateau with no peak). With
    them Grad-CAM+GE keeps Grad-CAM's pointing game (10/10) and Pearson 0.94 with it, where the reference
    settings invert it on dark objects (Pearson 0.11, -0.60 on the dog photo; pointing game 5/10).
    Against the authors' code (benchmarks/results_seed_parity.md) the default differs by design: Pearson
    0.548 / 0.773 with v1 / v2 on VGG-16, about 0 on ResNet-50 with random signed BN; reference mode 1.000000.

    `reference=v1` (or true) reproduces szandala/gradual-extrapolation (the paper's code), `reference=v2` the
    2023 revision (upsample only): every MaxPool and strided Conv of the model (not AveragePool), each conv's
    own output (before a BatchNorm: un-folded from the BN that canonicalisation folded into it, where the
    model has one), the raw normalised image as the last factor, z-score (unbiased std) + clip + min-max.
    Left different even then: normalisation and max(e) per image (the reference's run over the whole batch,
    identical for one image per call, as its demo runs); the revision hooks only the first strided conv of
    each torch container, which ONNX does not record, so every strided conv counts (the same set on
    torchvision's VGG, ResNet and MobileNetV2); a graph exported with BN already folded has no pre-BN tensor
    (the sidecar says so).

    Options: base (method name, for -m gradual-extrapolation), reference (false | true | v1 | v2), ge_variant
    (original | upsample), ge_combine (sum | max | mean (TorchPRISM) | none), ge_input (auto | raw | abs |
    skip), ge_scope (layer: nodes below the base layer | all: every down-sampling node, which also
    down-samples by e.g. VGG's pool5 after a conv5_3 map), ge_excitation (activation | output),
    ge_normalise (minmax | zscore-clip).
    """

    name = "gradual-extrapolation"
    uses_layer = True
    options = (Option("base", "str", "gradcam", "the method whose map is extrapolated (-m gradual-extrapolation)"),
               Option("ge_variant", "choice", "original", "original, or upsample (the 2023 revision)",
                      choices=VARIANTS),
               Option("ge_combine", "choice", "sum", "how an excitation's channels combine", choices=COMBINES),
               Option("ge_input", "choice", DEFAULTS["ge_input"], "the shallowest excitation (auto, raw, abs or "
                      "skip)", choices=INPUT_FACTORS),
               Option("ge_scope", "choice", "layer", "layer: nodes below the base layer; all: every "
                      "down-sampling node", choices=SCOPES),
               Option("ge_excitation", "choice", DEFAULTS["ge_excitation"], "activation, or output (as the "
                      "reference's hooks see it)", choices=EXCITATIONS),
               Option("ge_normalise", "choice", DEFAULTS["ge_normalise"], "final normalisation",
                      choices=NORMALISATIONS),
               Option("reference", "choice", "false", "v1 / true: the paper's code; v2: the 2023 revision (fix "
                      "the ge_* options as they do)", choices=REFERENCES))

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
        reference = str(req.option("reference", "false")).lower()
        if reference not in REFERENCES:
            raise SaliencyError(f"--option reference={reference!r}: expected one of {', '.join(REFERENCES)}")
        fixed = REFERENCE_OPTIONS.get(reference, {})
        for key in fixed:
            if req.options.get(key) is not None and str(req.options[key]) != fixed[key]:
                raise SaliencyError(f"--option {key}={req.options[key]!r} contradicts --option reference={reference}"
                                    f" (which sets {key}={fixed[key]}); give one of them")
        opts = {k: str(req.option(k, fixed.get(k, v))) for k, v in DEFAULTS.items()}
        for key, allowed in (("ge_variant", VARIANTS), ("ge_combine", COMBINES), ("ge_input", INPUT_FACTORS),
                             ("ge_scope", SCOPES), ("ge_excitation", EXCITATIONS), ("ge_normalise", NORMALISATIONS)):
            if opts[key] not in allowed:
                raise SaliencyError(f"--option {key}={opts[key]!r}: expected one of {', '.join(allowed)}")
        opts["reference"] = {"true": "v1"}.get(reference, reference)
        return opts

    def explain(self, req: Request) -> Result:
        from . import get_method

        refuse_transformer(req.engine.model, self.name, "Gradual Extrapolation refines a map through the spatial "
                           "down-sampling chain between the layer and the input, and a ViT has one patch embedding")
        base = self.base or get_method(str(req.option("base", "gradcam")))
        if isinstance(base, GradualExtrapolation):
            raise SaliencyError(f"-m {self.name}: the base method cannot itself be gradual extrapolation")
        opts = self._options(req)
        reference = opts["reference"] != "false"
        model = req.engine.model
        layers = req.layers if base.uses_layer and req.layers else [model.score_tensor]
        found = downsampling_excitations(model, layers, opts["ge_scope"],
                                         ("MaxPool",) if reference else ("MaxPool", "AveragePool"))
        notes = []
        names, signed = (activated(model, found) if opts["ge_excitation"] == "activation" else (found, []))
        if signed:
            notes.append(f"gradual extrapolation: no rectifier after {', '.join(signed)}; its signed output is used")
        input_factor = opts["ge_input"]
        if input_factor == "auto":
            input_factor = "skip" if names and names[0] == model.input_name else "raw"
        inner = [t for t in dict.fromkeys(names) if t != model.input_name]
        shared = _SharedForward(req.engine, req.x, inner)
        result = base.explain(replace(req, engine=shared))
        captured = shared.captured
        if captured is None:
            captured = req.engine.run(req.x, req.targets, expose=inner, outputs=inner, batch_size=req.batch_size)
        arrays = [req.x if t == model.input_name else captured[t] for t in names]
        if reference:
            unfolded = []
            for k, t in enumerate(names):
                if k > 0:
                    arrays[k], bn = pre_batchnorm(model, t, arrays[k])
                    if bn is not None:
                        unfolded.append(bn)
            notes.append("reference " + opts["reference"] + ": " + (
                f"conv outputs before BatchNorm, un-folded from {', '.join(unfolded)}" if unfolded else
                "no BatchNorm was folded into the down-sampling convs (an export with BN already folded has no "
                "pre-BN tensor: there the reference's excitation differs)") +
                "; normalised per image (the reference: over the batch)")
        coarse = result.raw if result.raw is not None else result.maps
        maps = extrapolate(coarse, [a for a in arrays if a.ndim == 4], req.size, opts["ge_variant"],
                           opts["ge_combine"], input_factor, opts["ge_normalise"], ddof=1 if reference else 0)
        used = ", ".join(f"{t} {a.shape[2]}x{a.shape[3]}" for t, a in zip(names, arrays) if a.ndim == 4)
        note = (f"gradual extrapolation of {base.name} ({opts['ge_variant']}, {opts['ge_combine']}, input factor "
                f"{input_factor}, {opts['ge_excitation']}, {opts['ge_normalise']}): "
                f"{used or 'no down-sampling layers found; map only normalised'}")
        return Result(self.name, maps, result.targets, result.scores, layers=result.layers, raw=coarse,
                      options={**result.options, **opts, "base": base.name},
                      notes=list(result.notes) + [note] + notes)
