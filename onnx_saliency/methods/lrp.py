"""LRP methods: `lrp` (any composite or rule map; signed relevance) and `excitation-backprop` (MWP)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .. import lrp as L
from ..errors import SaliencyError
from ..lrp.blocks import conservation_lines, token_stream
from . import register
from .base import Method, Request, Result
from .options import COMPOSITE, HIGH, LOW, LRP_INITS, RULE_MAP, Option


GAMMA_COMPOSITES = ("attnlrp", "cp-lrp")


class LRP(Method):
    """Bach et al. layer-wise relevance propagation: signed relevance at the input, with a rule per layer from a
    composite (default epsilon-plus-flat-nobias, lrp.DEFAULT_COMPOSITE: zennit's EpsilonPlusFlat with
    zero_params=["bias"], chosen in docs/lrp-bias.md; the list is in `onnx-saliency rules --help`) or a rule-map file.

    Options: composite, rule_map (JSON/YAML file), init (logit | one | contrastive | sglrp), low/high (z^B
    bounds; default from the model's preprocessing)."""

    name = "lrp"
    uses_layer = False
    default_composite = L.DEFAULT_COMPOSITE
    default_init = "logit"
    options = (replace(COMPOSITE, default=default_composite), RULE_MAP,
               Option("init", "choice", default_init, "initial relevance", choices=LRP_INITS), LOW, HIGH,
               Option("conv_gamma", "float", None, "gamma rule on conv layers instead of epsilon (attnlrp, cp-lrp)",
                      low=0.0),
               Option("dense_gamma", "float", None, "gamma rule on dense layers instead of epsilon (attnlrp, "
                      "cp-lrp)", low=0.0))

    def relevance(self, req: Request, at=()) -> dict:
        low, high = req.options.get("low"), req.options.get("high")
        name = req.option("composite", self.default_composite)
        gammas = {k: req.options[k] for k in ("conv_gamma", "dense_gamma") if req.options.get(k) is not None}
        if gammas:
            if str(name).lower().replace("_", "-") not in GAMMA_COMPOSITES or req.options.get("rule_map"):
                raise SaliencyError(f"--option {next(iter(gammas))}: only the {' and '.join(GAMMA_COMPOSITES)} "
                                    f"composites take a layer gamma (got composite {name!r}); a rule map sets "
                                    "gamma per layer itself")
            name = L.get_composite(name, **gammas)
        comp = L.resolve_composite(req.engine, name, req.options.get("rule_map"), low, high)
        return L.relevance_at(req.engine, req.x, req.targets, composite=comp, at=(req.engine.model.input_name,) +
                              tuple(at), init=req.option("init", self.default_init), batch_size=req.batch_size)

    def to_map(self, rel: np.ndarray) -> np.ndarray:
        return rel.sum(axis=1)

    def explain(self, req: Request) -> Result:
        model = req.engine.model
        # transformers: relevance also on the residual stream, for per-block conservation and the embeddings' share
        stream = token_stream(model.canonical, model.score_tensor)
        out = self.relevance(req, stream.tensors() if stream else ())
        rel = out["relevance"][model.input_name].astype(np.float32)
        notes = [f"composite {out['composite']}, init {req.option('init', self.default_init)}",
                 "conservation: sum R(input) / start = " + ", ".join(
                     f"{s:.4g}" for s in rel.reshape(len(rel), -1).sum(1) / np.where(out["start"] == 0, 1, out["start"]))]
        if stream:
            notes += conservation_lines(stream, out["relevance"], out["start"])
        return Result(self.name, self.to_map(rel).astype(np.float32), out["targets"], out["target_score"],
                      attributions=rel, signed=self.signed, options={"composite": out["composite"],
                                                                     "init": req.option("init", self.default_init)},
                      notes=notes)

    signed = True


class ExcitationBackprop(LRP):
    """Zhang et al. MWP as zennit's ExcitationBackprop composite, one-hot 1 initial relevance; map ReLU(sum_c)."""

    name = "excitation-backprop"
    default_composite = "excitation-backprop"
    default_init = "one"
    options = (replace(COMPOSITE, default=default_composite), RULE_MAP,
               Option("init", "choice", default_init, "initial relevance", choices=LRP_INITS), LOW, HIGH)
    signed = False

    def to_map(self, rel):
        return np.maximum(rel.sum(axis=1), 0)


register(LRP)
register(ExcitationBackprop)
