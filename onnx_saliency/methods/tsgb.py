"""`tsgb`: Target-Selective Gradient Backprop (Cheng et al., IEEE TIP 2022; methods-spec section 3).

One forward and one modified backward pass (graph_passes.tsgb); the map is sum_c x * g-hat at the input.
The map is signed and implicitly contrastive (the target's rectified contribution sums to zero at the
classifier input); the reference displays max(S, 0) / max|S|, which the diverging picture shows as its red half.

On networks with strided convolutions (ResNet, EfficientNet, MobileNet stems) the map carries a regular period-2
grid: TSGB-Conv spreads relevance over overlapping receptive fields, and with a 3x3 stride-2 kernel the overlap
alternates 2, 1, 2, 1 per axis (4:2:2:1 per 2x2 block). This is the method's own behaviour, reproduced by the
authors' algorithm (graph_passes.tsgb.conv_rule); VGG-16, the paper's default, has no strided convs and no grid.

Options: classifier (node name, or a list of names, that gets TSGB-FC; default the linear layer nearest the
output); reference (false | true): grouped and depthwise convs redistribute over all channels, as the code the
reference actually runs (its "slim" backward; the full version it leaves commented out keeps the groups, as our
default), and each BatchNorm the model has stays a node with the reference's LRP-BN rule g BN(x) / (x + 1e-10)
instead of being folded into its conv: the same except where a conv's output is exactly 0 before its BN (a
receptive field of zeros, no bias), where the reference's conv rule multiplies g BN(0) / 1e-10 by that 0 and
drops the relevance the folded conv keeps (on MobileNetV2 with random weights this is most of the
difference). The classifier's classifier_layers are chosen on the folded graph; the names are the same.
Measured against a torch re-implementation of the reference (benchmarks/results_seed_parity.md, random signed BN):
MobileNetV2 Pearson 0.971 by default, 1.000000 with reference=true; ResNet-50 and VGG-16 1.000000 either way.
"""

from __future__ import annotations

import numpy as np

import graph_passes as gp
from graph_passes.tsgb import append_tsgb, classifier_layers

from ..engine import check_finite
from ..intake.model import inference_mode_batchnorm
from ..errors import SaliencyError, UnsupportedModelError
from ..intake.layers import refuse_transformer
from . import register
from .base import Method, Request, Result
from .options import Option


class TSGB(Method):
    """Cheng et al. target-selective gradient backprop: TSGB-FC on the classifier, TSGB-Conv on convs; sum_c x*g."""

    name = "tsgb"
    uses_layer = False
    options = (Option("classifier", "names", None, "the linear layers that get TSGB-FC, node names (default: "
                      "found from the scores)"),
               Option("reference", "bool", False, "reproduce the authors' reference code (see the method's description)"))

    def explain(self, req: Request) -> Result:
        engine, model = req.engine, req.engine.model
        refuse_transformer(model, self.name, "TSGB guides its backward pass through the ReLU and max-pool "
                           "down-sampling stages of a CNN")
        chosen = req.options.get("classifier")
        names = None if chosen is None else tuple([chosen] if isinstance(chosen, str) else chosen)
        try:
            classifier = classifier_layers(model.canonical, names)
        except gp.GraphPassError as err:
            raise SaliencyError(f"tsgb --option classifier: {err}") from err
        score, inp = model.score_tensor, model.input_name
        reference = str(req.option("reference", "false")).lower()
        if reference not in ("false", "true", "0", "1"):
            raise SaliencyError(f"--option reference={reference!r}: expected true or false")
        group_blind = reference in ("true", "1")

        def build(canonical):
            if group_blind:  # the reference's LRP-BN rule on each BatchNorm, as the model has it
                canonical = gp.canonicalize(inference_mode_batchnorm(model.original, model.path)[0], fold_bn=False)
            m = gp.append_target_seed(gp.expose_tensors(canonical, [score]), score)
            try:
                return append_tsgb(m, score, [inp], seed=gp.SEED, classifier=classifier, group_blind=group_blind)
            except gp.GraphPassError as err:
                raise UnsupportedModelError(f"tsgb on {model.path.name}: {err}") from err

        sess, _, _ = engine.session(("tsgb", tuple(classifier), group_blind), build)
        wanted = [gp.RESOLVED, gp.TARGET_SCORE, gp.grad_name(inp)]
        out = engine.run_session(sess, wanted, req.x, req.targets, batch_size=req.batch_size,
                                 where=f"{model.path.name} (tsgb)")
        attr = (req.x * out[gp.grad_name(inp)]).astype(np.float32)
        ops = {node.name: node.op_type for node in model.canonical.graph.node}
        notes = ["TSGB-FC on " + ", ".join(f"{n} ({ops[n]}{', per position' if ops[n] == 'Conv' else ''})"
                                          for n in classifier) if classifier else
                 "no linear layer before the scores: no TSGB-FC, the head keeps its plain gradient"]
        grouped = [n.name for n in model.canonical.graph.node
                   if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        if grouped:
            notes.append(f"{len(grouped)} grouped/depthwise conv(s): " + (
                "redistributed over all channels, as the reference code's slim backward (reference=true)"
                if group_blind else "redistributed within each group (the reference code ignores the groups; "
                "reference=true reproduces it)"))
        return Result(self.name, attr.sum(axis=1), out[gp.RESOLVED], out[gp.TARGET_SCORE], attributions=attr,
                      signed=True, options={"classifier": list(classifier), "reference": str(group_blind).lower()},
                      notes=notes)


register(TSGB)
