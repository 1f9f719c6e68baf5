"""Relevance-CAM (Lee et al., CVPR 2021): channel weights from LRP relevance at the chosen layer."""

from __future__ import annotations

import re

import numpy as np

from graph_passes import lrp as R

from .. import lrp as L
from ..errors import SaliencyError
from ..intake.model import inference_mode_batchnorm
from .base import Method, Request, Result
from .options import Option
from .gradual import extra_exposures, hand_over
from .layer_maps import combine_layer_maps, spatial

# spec section 2.6 head modes -> onnx_saliency.lrp initial relevance
HEAD_MODES = {"clrp": "contrastive", "contrastive": "contrastive", "lrp": "one", "one": "one",
              "sglrp": "sglrp", "logit": "logit"}


def _zplus_no_bias(stabilizer: float) -> R.LRPRule:
    """The reference Linear relprop (alpha 1, beta 0): x+w+ and x-w- over signed inputs, no bias in Z."""
    return R.LRPRule("zplus-nobias", groups=(R.Group((R.Term("x+", "w+", "zero"), R.Term("x-", "w-", "zero"))),),
                     eps=stabilizer)


def _zplus_double_bias(stabilizer: float, nonneg_input: bool, tails: str = "fuse") -> R.LRPRule:
    """The reference Conv2d relprop: Z = (conv(x+, w+) + b) + (conv(x-, w-) + b).

    On a provably non-negative input the x- term vanishes from the graph, but the reference still adds its
    bias; (W+x+ + b) + (W+x+ + b) - W+x+ puts 2b in Z while the relevance still flows through W+x+ once
    (the propagator applies a term's sign, not its magnitude, to Z, hence the repeated term).
    """
    if nonneg_input:
        terms = (R.Term("x+", "w+", "b"), R.Term("x+", "w+", "b"), R.Term("x+", "w+", "zero", -1.0))
    else:
        terms = (R.Term("x+", "w+", "b"), R.Term("x-", "w-", "b"))
    return R.LRPRule("zplus-double-bias" if tails == "fuse" else "zplus-double-bias-bn-pass",
                     groups=(R.Group(terms),), eps=stabilizer, tails=tails)


def relevance_cam_composite(canonical, conv_bias: str = "zennit", stabilizer: float = 1e-9,
                            bn: str = "fuse") -> L.Composite:
    """The reference code's rules as far as the propagator expresses them (see RelevanceCAM). bn="pass": the
    conv rules use each conv's own weight and bias and a BatchNorm after it passes relevance (reference mode,
    on a graph whose BatchNorms were kept)."""
    dense = (L.DENSE, _zplus_no_bias(stabilizer))
    if conv_bias == "zennit":
        return L.Composite("relevance-cam", (dense, (L.CONV, R.ZPlus(stabilizer))), stabilizer=stabilizer)
    if conv_bias != "reference":
        raise SaliencyError(f"--option conv_bias={conv_bias!r}: expected 'zennit' or 'reference'")
    a = R.analyze(canonical)
    entries = [(L.Match(op=("conv",), name=f"^{re.escape(name)}$"),
                _zplus_double_bias(stabilizer, a.nodes[name].input[0] in a.nonneg, bn))
               for name, layer in a.linear.items() if layer.kind == "conv"]
    return L.Composite("relevance-cam-reference" + ("-bn-pass" if bn == "pass" else ""), tuple(entries) + (dense,),
                       stabilizer=stabilizer)


def _reference_relevance(engine, x, targets, layers, expose, init, stabilizer, batch_size):
    """Relevance as the reference code computes it: on the model canonicalised with its BatchNorms kept, conv
    rules over each conv's own weight and bias (the double-bias z+), BatchNorm passing relevance. The graph is
    built once per session key (the engine caches the session)."""
    import graph_passes as gp

    model = engine.model
    score = model.score_tensor
    holder = {}

    def build(_canonical):
        kept = gp.canonicalize(inference_mode_batchnorm(model.original, model.path)[0], fold_bn=False)
        comp = relevance_cam_composite(kept, "reference", stabilizer, bn="pass")
        holder["composite"] = comp
        m = gp.expose_tensors(kept, sorted(set(expose) | set(layers) | {score}))
        analysis = R.analyze(m)
        rules = comp.assign(m, analysis)
        m = gp.append_target_seed(m, score)
        m, seed = L.append_initial_relevance(m, score, init, model.num_classes)
        return R.append_lrp(m, score, list(layers), seed=seed, rules=rules, analysis=analysis)

    key = ("relevance-cam-reference", tuple(layers), init, tuple(expose), stabilizer)
    sess, _, _ = engine.session(key, build)
    comp = L.Composite("relevance-cam-reference-bn-pass", stabilizer=stabilizer)
    wanted = [score, gp.RESOLVED, gp.TARGET_SCORE] + [gp.grad_name(t) for t in layers] + [
        t for t in expose if t != score]
    return L.run_relevance(engine, sess, wanted, x, targets, batch_size, comp, tuple(layers), init)


class RelevanceCAM(Method):
    """Relevance-CAM: sum_k mean(R_k) A_k with R the LRP relevance at the layer; works at any layer.

    Initial relevance CLRP (1 at the target, -1/C elsewhere, not scaled by the logit); relevance is
    propagated only from the scores down to the requested layers, all of them in one onnxruntime call.
    The map is not rectified (the official code applies no ReLU); per-image min-max, bilinear resize.

    Options: init (clrp | lrp | sglrp | logit; default clrp), relu (0 | 1, default 0), conv_bias
    (zennit | reference, default zennit), stabilizer (default 1e-9), composite (any built-in LRP composite
    name instead of the reference rules).

    Rules against the reference code (mongeoroo/Relevance-CAM, spec section 2.2): dense layers z+ over
    signed inputs without bias, as the reference. Convolutions z+ with zennit's bias handling (b+ in the
    denominator) by default; conv_bias=reference adds the full bias to both partial sums, the reference's
    quirk. ReLU and dropout pass, max-pool winner-take-all, average pools and residual adds split in
    proportion to their inputs, as the reference. By default BatchNorm is folded into the preceding conv, so
    its scale (negative ones flip which weights count as positive) and bias take part in the conv's rule,
    where the reference passes relevance through BN unchanged: measured on ResNet-50 with random signed BN,
    layer3 Pearson 0.968 / 0.987 (two classes), layer2 0.99995 (benchmarks/results_seed_parity.md).
    reference=true reproduces the reference (1.000000): the graph canonicalised with its BatchNorms kept,
    each conv's own weight and bias (none in torchvision's ResNets) in the double-bias z+, BN passing
    relevance; an export whose BN the exporter already folded has no BN to pass. Left different: the
    stabiliser z + eps*sign(z) (eps 1e-9) where the reference's safe_divide returns 0 for 0/0.
    """

    name = "relevance-cam"
    options = (Option("init", "choice", "clrp", "initial relevance", choices=tuple(HEAD_MODES)),
               Option("relu", "bool", False, "rectify the map (the official code does not)"),
               Option("conv_bias", "choice", "zennit", "conv bias handling: zennit (b+ in the denominator) or "
                      "reference (the official code's quirk)", choices=("zennit", "reference")),
               Option("stabilizer", "float", 1e-9, "epsilon of the z stabiliser", low=0.0, high=1.0),
               Option("composite", "str", None, "an LRP composite instead of the reference rules"),
               Option("reference", "bool", False, "reproduce the authors' reference code (see the method's description)"))

    def explain(self, req: Request) -> Result:
        if not req.layers:
            raise SaliencyError(f"-m {self.name}: needs a layer (--layer)")
        reference = str(req.option("reference", "false")).lower()
        if reference not in ("false", "true", "0", "1"):
            raise SaliencyError(f"--option reference={reference!r}: expected true or false")
        reference = reference in ("true", "1")
        if reference:
            for key, value in (("init", "clrp"), ("conv_bias", "reference"), ("relu", False)):
                given = req.options.get(key)  # parsed to its declared type (relu: a bool)
                if given is not None and str(given).lower() != str(value).lower():
                    raise SaliencyError(f"--option {key}={given!r} contradicts --option reference=true (which sets "
                                        f"{key}={value}); give one of them")
            if req.options.get("composite") is not None:
                raise SaliencyError("--option composite contradicts --option reference=true; give one of them")
        init_opt = str(req.option("init", "clrp")).lower()
        if init_opt not in HEAD_MODES:
            raise SaliencyError(f"--option init={init_opt!r}: expected one of clrp, lrp, sglrp, logit")
        init = HEAD_MODES[init_opt]
        relu = bool(int(req.option("relu", 0)))
        conv_bias = str(req.option("conv_bias", "reference" if reference else "zennit"))
        stabilizer = float(req.option("stabilizer", 1e-9))
        ride = extra_exposures(req.engine, req.x)
        expose = tuple(dict.fromkeys([*req.layers, *ride]))
        notes = []
        if reference:
            out = _reference_relevance(req.engine, req.x, req.targets, req.layers, expose, init, stabilizer,
                                       req.batch_size)
            comp_name = "relevance-cam-reference-bn-pass"
            folded = req.engine.model.report.folded_bn
            notes.append("reference: each conv's own weight and bias in the double-bias z+ rule, BatchNorm passes "
                         f"relevance ({len(folded)} BatchNorm(s) kept for it); an export whose BatchNorms were "
                         "folded by the exporter has no separate BN to pass: there the folded bias counts")
        else:
            if req.options.get("composite") is not None:
                comp = L.resolve_composite(req.engine, req.options["composite"])
            else:
                comp = relevance_cam_composite(req.engine.model.canonical, conv_bias, stabilizer)
            comp_name = comp.name
            out = L.relevance_at(req.engine, req.x, req.targets, at=req.layers, composite=comp, init=init,
                                 batch_size=req.batch_size, expose=expose)
        hand_over(req.engine, {t: out[t] for t in ride})
        raws = []
        for layer in req.layers:
            A = spatial(out[layer], self.name, layer).astype(np.float64)
            alpha = out["relevance"][layer].astype(np.float64).mean(axis=(2, 3))
            cam = np.einsum("nk,nkhw->nhw", alpha, A)
            raws.append((np.maximum(cam, 0) if relu else cam).astype(np.float32))
        notes.insert(0, f"composite {comp_name}, init {init}, relu {int(relu)}; alpha_k = spatial mean of relevance")
        return Result(self.name, combine_layer_maps(raws, req.size), out["targets"], out["target_score"],
                      layers=list(req.layers), raw=raws[0] if len(raws) == 1 else None,
                      options={"init": init_opt, "relu": int(relu), "composite": comp_name,
                               "reference": str(reference).lower()}, notes=notes)
