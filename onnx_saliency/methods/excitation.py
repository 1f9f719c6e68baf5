"""Contrastive excitation backprop (c-MWP, Zhang et al. ECCV 2016) with TorchRay's rules, in one graph."""

from __future__ import annotations

import numpy as np
import onnx

import graph_passes as gp
from graph_passes import lrp as R
from graph_passes._graph import ancestors, summarize_nodes

from .. import lrp as L
from ..errors import SaliencyError, UnsupportedModelError
from ..intake.layers import auto_layer
from .base import Method, Request, Result
from .options import Option
from .gradual import extra_exposures, hand_over
from .layer_maps import combine_layer_maps, spatial, tensor_or_node

EPS = 1e-12  # TorchRay adds 1e-20; float32 relevance needs a stabiliser that is still representable


def excitation_rule(dual: bool = False) -> R.LRPRule:
    """TorchRay's EB backward: p' = x * W+^T (p / W+ x), no bias, input not clamped. The dual (negated
    classifier) uses (-W)+ = -W-: z = -(W- x), p' = -x * W-^T (p / z)."""
    term = R.Term("x", "w-", "zero", -1.0) if dual else R.Term("x", "w+", "zero")
    return R.LRPRule("eb-dual" if dual else "eb", groups=(R.Group((term,)),), eps=EPS)


def torchray_composite() -> L.Composite:
    """EB on every linear layer; pools / residual sums proportional, ReLU, max-pool, BN plain gradient."""
    return L.Composite("excitation-backprop-torchray", ((L.ANY_LINEAR, excitation_rule()),),
                       base_overrides=L.excitation_backprop().base_overrides, stabilizer=EPS)


def classifier_node(model, name: str | None) -> onnx.NodeProto:
    a = R.analyze(model.canonical)
    if name is not None:
        if name not in a.linear:
            raise SaliencyError(f"--option classifier={name!r}: not a Conv/Gemm/MatMul node with constant weights "
                                f"in {model.path.name}")
        return a.nodes[name]
    last = [n for n in a.last if a.linear[n].out in ancestors(model.canonical.graph, [model.score_tensor])]
    if len(last) != 1:
        raise SaliencyError(f"-m contrastive-excitation-backprop: {len(last)} candidate classifier layers in "
                            f"{model.path.name} ({', '.join(sorted(last)) or 'none'}); pass --option classifier=NODE")
    return a.nodes[last[0]]


def _rename_output(m: onnx.ModelProto, old: str, new: str) -> None:
    """append_lrp names its outputs grad_name(t); several passes to the same tensor need distinct names."""
    for node in m.graph.node:
        for i, o in enumerate(node.output):
            if o == old:
                node.output[i] = new
    for out in m.graph.output:
        if out.name == old:
            out.name = new


class ContrastiveExcitationBackprop(Method):
    """c-MWP: ReLU(sum_c P_c) at the saliency layer (--layer), where P is excitation backprop of the target
    minus that of the "dual" network whose classifier weights are negated, subtracted at the contrast layer.

    Mapping to TorchRay's contrastive_excitation_backprop: its first backward (classifier weights negated)
    gives the dual signal D at `contrast_layer`; its second backward replaces the target signal there by
    P - D and continues to `saliency_layer`. Excitation backprop is linear in the signal for fixed
    activations, so the same map is (target EB from the scores to the saliency layer) minus (EB of D from
    the contrast layer to the saliency layer). One graph computes both, plus D, in one onnxruntime call.
    Rules as TorchRay: Conv/Gemm/MatMul p' = x * W+^T (p / W+ x) without bias (stabiliser 1e-12 instead of
    1e-20), average pools and residual sums proportional, ReLU / max-pool / BatchNorm plain gradient; seed
    one-hot at the target (pre-softmax scores). The dual classifier uses (-W)+ and no bias; unfolded BN
    after a conv is fused into its weights (TorchRay passes the signal through BN unchanged).

    Options: contrast_layer (tensor or node; default the input of the classifier layer), classifier (node;
    default the last linear layer before the scores). Where the auto layer lies past the default contrast
    layer (SqueezeNet: the classifier conv's own output), the map is taken at the contrast layer (noted).
    """

    name = "contrastive-excitation-backprop"
    options = (Option("contrast_layer", "str", None, "tensor or node where the dual signal is subtracted "
                      "(default: the classifier layer's input)"),
               Option("classifier", "str", None, "the classifier node (default: the last linear layer)"))

    def explain(self, req: Request) -> Result:
        if not req.layers:
            raise SaliencyError(f"-m {self.name}: needs a saliency layer (--layer)")
        model = req.engine.model
        clf = classifier_node(model, req.options.get("classifier"))
        contrast = (tensor_or_node(model, str(req.options["contrast_layer"]), "contrast_layer")
                    if req.options.get("contrast_layer") is not None else clf.input[0])
        graph = model.canonical.graph
        if contrast not in ancestors(graph, [clf.input[0]]):
            raise SaliencyError(f"--option contrast_layer={contrast!r}: must lie before the classifier layer "
                                f"{clf.name} (it is where the dual signal is subtracted)")
        layers, notes = [], []
        for layer in req.layers:
            if (layer not in ancestors(graph, [contrast]) and req.options.get("contrast_layer") is None
                    and layer == auto_layer(model)):
                # e.g. SqueezeNet: the auto layer is the classifier conv's output, past any contrast layer
                notes.append(f"auto layer {layer} lies after the contrast layer; saliency at {contrast} instead")
                layer = contrast
            layers.append(layer)
            if layer not in ancestors(graph, [contrast]):
                raise SaliencyError(f"-m {self.name}: saliency layer {layer!r} does not feed the contrast layer "
                                    f"{contrast!r}; pick an earlier --layer or a later contrast_layer")
        layers = list(dict.fromkeys(layers))
        ride = list(extra_exposures(req.engine, req.x))
        out = self._run(req, clf.name, contrast, tuple(layers), tuple(ride))
        hand_over(req.engine, {t: out[t] for t in ride})
        raws = []
        for layer in layers:
            target = out[f"cmwp/target/{layer}"]
            dual = out["cmwp/dual"] if layer == contrast else out[f"cmwp/contrast/{layer}"]
            diff = spatial(target, self.name, layer) - dual
            raws.append(np.maximum(diff.sum(axis=1), 0).astype(np.float32))
        return Result(self.name, combine_layer_maps(raws, req.size), out["targets"], out["target_score"],
                      layers=layers, raw=raws[0] if len(raws) == 1 else None,
                      options={"contrast_layer": contrast, "classifier": clf.name},
                      notes=notes + [f"c-MWP: dual classifier {clf.name} (weights negated), contrast at {contrast}"])

    def _run(self, req: Request, classifier: str, contrast: str, layers: tuple, ride: tuple) -> dict:
        model, engine = req.engine.model, req.engine
        score = model.score_tensor
        comp = torchray_composite()
        others = tuple(t for t in layers if t != contrast)

        def build(canonical):
            a = R.analyze(canonical)
            rules = comp.assign(canonical, a)
            dual_rules = {**rules, classifier: excitation_rule(dual=True)}
            m = gp.expose_tensors(canonical, sorted({score, *ride}))
            m = gp.append_target_seed(m, score)
            try:
                m = R.append_lrp(m, score, list(layers), seed=gp.SEED, rules=rules, analysis=a,
                                 prefix="cmwp/target/")
                for t in layers:
                    _rename_output(m, gp.grad_name(t), f"cmwp/target/{t}")
                m = R.append_lrp(m, score, [contrast], seed=gp.SEED, rules=dual_rules, analysis=a,
                                 prefix="cmwp/dual/")
                _rename_output(m, gp.grad_name(contrast), "cmwp/dual")
                if others:
                    m = R.append_lrp(m, contrast, list(others), seed="cmwp/dual", rules=rules, analysis=a,
                                     prefix="cmwp/contrast/")
                    for t in others:
                        _rename_output(m, gp.grad_name(t), f"cmwp/contrast/{t}")
            except gp.UnsupportedOpsError as err:
                raise UnsupportedModelError(f"-m {self.name}: no excitation rule for {len(err.nodes)} node(s): "
                                            f"{summarize_nodes(err.nodes)}") from err
            except gp.GraphPassError as err:
                raise UnsupportedModelError(f"-m {self.name}: {err}") from err
            return m

        sess, _, _ = engine.session(("cmwp", classifier, contrast, layers, ride), build)
        wanted = ([score, gp.RESOLVED, gp.TARGET_SCORE] + [f"cmwp/target/{t}" for t in layers] + ["cmwp/dual"]
                  + [f"cmwp/contrast/{t}" for t in others] + list(ride))
        return L.run_relevance(engine, sess, wanted, req.x, req.targets, req.batch_size, comp, (), "one")
