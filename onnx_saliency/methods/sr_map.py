"""`sr-map`: Salient Relevance map (Li, Tian, Mueller, Chen 2019; methods-spec section 1).

Step A: an LRP heatmap R(x) with the reference composite (z+ without bias on dense layers, LRP-0 on every
conv, ReLU pass-through, winner-take-all max-pool; initial relevance the target logit). Step B: |R| rendered
as an image, min-max jointly over channels and pixels, 0-255 uint8 RGB. Step C: context-aware saliency of
that heatmap image (not of the photo; the photo plays no part after the LRP pass), resized to the input and
min-max normalised.

Options: composite (default sr-reference; any built-in name), rule_map, init (default logit), heatmap_mode
(rgb_abs | gray_abs | gray_pos), ca_resolution (longest side of the saliency step, default 250), ca_grid
(patch centres per side, see context_saliency; 0 = the reference's dense search).
reference (false | true): the notebook's quirks: max-pool relevance routed by max_unpool2d, which overwrites
where overlapping windows (AlexNet's 3x3 stride-2 pools) share an argmax (the default adds, conserving), the
heatmap truncated to uint8 (default rounded), and the dense saliency search (ca_grid=0).
Not reproduced: the reference saves the heatmap as a lossy JPEG before the saliency step; here it stays exact.
The saliency step is Goferman's MATLAB code in the paper (not in the reference repository); ours follows the
public re-implementation (methods-spec 1.1 C) with OpenCV's Lab conversion.
"""

from __future__ import annotations

import numpy as np

from graph_passes import lrp as R

from .. import lrp as L
from .context_saliency import context_aware_saliency
from ..errors import SaliencyError
from ..intake.layers import refuse_transformer
from ..output.postprocess import minmax
from . import register
from .base import Method, Request, Result
from .options import HIGH, LOW, LRP_INITS, RULE_MAP, Option

HEATMAP_MODES = ("rgb_abs", "gray_abs", "gray_pos")


def sr_reference(stabilizer: float = 1e-9, overwrite_unpool: bool = False) -> L.Composite:
    """The SR notebooks' rules: R_i = x_i sum_j w+_ij R_j / (sum_i' x_i' w+_i'j + eps) on dense layers (no
    bias, x not rectified), LRP-0 with the bias in z on convs; eps 1e-9 (here sign-aware; z+ sums are >= 0 on
    rectified inputs, so only a conv z within 1e-9 below zero can tell the difference)."""
    zplus_no_bias = R.LRPRule("zplus-nobias", groups=(R.Group((R.Term("x", "w+", "zero"),)),), eps=stabilizer)
    lrp0 = R.LRPRule("lrp0", groups=(R.Group((R.Term("x", "w", "b"),)),), eps=stabilizer)
    if overwrite_unpool:  # max_unpool2d: overlapping windows that share an argmax overwrite each other
        return L.Composite("sr-reference-overwrite", ((L.DENSE, zplus_no_bias), (L.CONV, lrp0)),
                           base_overrides=(("MaxPool", R.UnpoolOverwrite()),), stabilizer=stabilizer)
    return L.Composite("sr-reference", ((L.DENSE, zplus_no_bias), (L.CONV, lrp0)), stabilizer=stabilizer)


def heatmap_image(relevance: np.ndarray, mode: str = "rgb_abs", bgr: bool = False,
                  truncate: bool = False) -> np.ndarray:
    """(C, H, W) relevance -> uint8 image: (H, W, 3) RGB for rgb_abs on 3 channels, else (H, W) gray."""
    if mode not in HEATMAP_MODES:
        raise SaliencyError(f"heatmap_mode {mode!r}: expected one of {', '.join(HEATMAP_MODES)}")
    rel = np.asarray(relevance, np.float64)
    if mode == "rgb_abs" and rel.shape[0] == 3:
        heat = np.abs(rel[::-1] if bgr else rel).transpose(1, 2, 0)
    elif mode == "gray_pos":
        heat = np.maximum(rel, 0).sum(axis=0)
    else:
        heat = np.abs(rel).sum(axis=0)
    low, high = heat.min(), heat.max()
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    return (scaled * 255 if truncate else np.round(scaled * 255)).astype(np.uint8)  # the notebook truncates


L.COMPOSITES["sr-reference"] = lambda **params: sr_reference(**params)  # --composite sr-reference for any LRP method


class SRMap(Method):
    """Li et al. SR map: LRP heatmap (z+ dense, LRP-0 conv, winner-take-all pooling) -> context-aware saliency."""

    name = "sr-map"
    uses_layer = False
    options = (Option("composite", "str", "sr-reference", "LRP composite of step A"), RULE_MAP,
               Option("init", "choice", "logit", "initial relevance", choices=LRP_INITS),
               Option("heatmap_mode", "choice", "rgb_abs", "how |R| becomes an image", choices=HEATMAP_MODES),
               Option("ca_resolution", "int", 250, "longest side of the context-aware saliency step", low=8,
                      high=4096),
               Option("ca_grid", "int", 48, "patch centres per side (0: the reference's dense search)", low=0,
                      high=4096),
               LOW, HIGH,
               Option("reference", "bool", False, "reproduce the authors' notebooks (max-unpool relevance, uint8 "
                      "heatmap, dense saliency search)"))

    def explain(self, req: Request) -> Result:
        refuse_transformer(req.engine.model, self.name, "its reference LRP (z+ dense, LRP-0 conv, winner-take-all "
                           "max-pool) and saliency step are defined on ReLU CNN heatmaps with spatial down-sampling")
        reference = str(req.option("reference", "false")).lower()
        if reference not in ("false", "true", "0", "1"):
            raise SaliencyError(f"--option reference={reference!r}: expected true or false")
        reference = reference in ("true", "1")
        if reference and req.options.get("composite") not in (None, "sr-reference"):
            raise SaliencyError("--option composite contradicts --option reference=true; give one of them")
        if reference:
            comp = sr_reference(overwrite_unpool=True)
        else:
            comp = L.resolve_composite(req.engine, req.option("composite", "sr-reference"),
                                       req.options.get("rule_map"), req.options.get("low"), req.options.get("high"))
        init = req.option("init", "logit")
        mode = req.option("heatmap_mode", "rgb_abs")
        size = int(req.option("ca_resolution", 250))
        grid = int(req.option("ca_grid", 0 if reference else 48)) or None
        out = L.relevance_at(req.engine, req.x, req.targets, composite=comp, init=init, batch_size=req.batch_size)
        rel = out["relevance"][req.engine.model.input_name].astype(np.float32)
        bgr = req.engine.model.preprocessing().spec.channel_order == "BGR"
        sal = np.stack([context_aware_saliency(heatmap_image(r, mode, bgr, truncate=reference), working_size=size,
                                               grid=grid) for r in rel])
        notes = [f"LRP composite {comp.name} (init {init}) -> |R| image ({mode}) -> context-aware "
                 f"saliency at {size} px, {'dense search' if grid is None else f'grid {grid}'}"]
        if reference:
            notes.append("reference: max-pool relevance routed as max_unpool2d (overlapping windows that share an "
                         "argmax overwrite each other; not conserving), heatmap truncated to uint8; still "
                         "different: no lossy JPEG between the steps, OpenCV Lab (D65) for the saliency step, "
                         "stabiliser sign-aware")
        return Result(self.name, minmax(sal).astype(np.float32), out["targets"], out["target_score"],
                      attributions=rel, options={"composite": comp.name, "init": init, "heatmap_mode": mode,
                                                 "ca_resolution": size, "ca_grid": grid or 0,
                                                 "reference": str(reference).lower()}, notes=notes)


register(SRMap)
