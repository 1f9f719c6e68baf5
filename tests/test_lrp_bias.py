"""Bias handling as a rule parameter (graph_passes.lrp.BIAS_MODES): "keep" lets a folded BatchNorm's shift absorb
relevance at every layer, "zero" (zennit's zero_params=["bias"], the `-nobias` composites) passes it all on.
zennit parity of the bias-free composites: tests/test_lrp_zennit.py::test_zennit_parity_bias_free."""

import numpy as np
import onnx
import pytest
from onnx import helper

from graph_passes import lrp as R
from onnx_saliency import Explainer, lrp
from onnx_saliency.engine import Engine
from onnx_saliency.intake.model import load_model
from tests.graphs import make_model


def _bn_net(path):
    """conv -> relu -> conv -> BatchNorm (large positive shift, folded by canonicalisation) -> relu -> GAP -> gemm.
    The first conv gets the flat rule, which has no bias in either mode; the second carries the folded shift."""
    rng = np.random.default_rng(5)
    p = {"w1": (rng.standard_normal((6, 3, 3, 3)) * 0.4).astype(np.float32),
         "w2": (rng.standard_normal((6, 6, 3, 3)) * 0.3).astype(np.float32),
         "gamma": (1 + 0.2 * rng.standard_normal(6)).astype(np.float32), "beta": np.full(6, 2.0, np.float32),
         "mean": np.zeros(6, np.float32), "var": np.ones(6, np.float32),
         "b1": np.full(6, 0.3, np.float32), "fc": rng.standard_normal((3, 6)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["a2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["a2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="fc")]
    model = make_model(nodes, [("input", (None, 3, 10, 10))], [("logits", (None, 3))], p)
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="raw"))
    onnx.save(model, path)
    return path


def test_rule_bias_parameter_is_data():
    plus = R.ZPlus()
    free = R.with_bias(plus, "zero")
    assert free.bias == "zero" and all(t.bias == "zero" for g in free.groups for t in g.terms)
    assert plus.bias == "keep" and plus.groups[0].terms[0].bias == "b+"  # the input is not edited
    assert free.describe() == "zplus(eps=1e-06, bias=zero)" and plus.describe() == "zplus(eps=1e-06)"
    assert R.make_rule("epsilon", bias="zero") == R.with_bias(R.Epsilon(), "zero")
    assert R.Epsilon().reuses_forward and not R.with_bias(R.Epsilon(), "zero").reuses_forward  # z without b
    assert R.with_bias(R.Norm(), "zero") == R.Norm()  # nothing to remove outside linear layers
    assert R.with_bias(R.Flat(), "zero") == R.Flat()  # nor from a rule without bias terms
    with pytest.raises(ValueError, match="bias 'sink'"):
        R.with_bias(plus, "sink")
    with pytest.raises(ValueError, match="make it again"):
        R.with_bias(free, "keep")


def test_nobias_composites_named_and_built():
    names = lrp.composite_names()
    assert "epsilon-plus-flat-nobias" in names and "epsilon-plus-flat" in names
    assert "excitation-backprop-nobias" not in names
    comp = lrp.get_composite("epsilon-plus-flat-nobias")
    assert comp.name == "epsilon-plus-flat-nobias"
    assert {r.name: r.bias for _, r in comp.entries} == {"flat": "keep", "zplus": "zero", "epsilon": "zero"}
    assert {r.bias for _, r in lrp.get_composite("epsilon-plus-flat").entries} == {"keep"}


def test_bias_free_rules_keep_the_relevance_the_folded_shift_absorbs(tmp_path):
    path = _bn_net(tmp_path / "bn.onnx")
    engine = Engine(load_model(path), threads=1)
    x = np.random.default_rng(2).uniform(0, 1, (2, 3, 10, 10)).astype(np.float32)
    kept = {}
    for name in ("epsilon-plus-flat", "epsilon-plus-flat-nobias"):
        rows = lrp.conservation_table(engine, x, None, composite=name)
        conv2 = next(r for r in rows if r["node"] == "conv2")
        kept[name] = conv2["in"] / conv2["out"]
        out = lrp.relevance_at(engine, x, None, composite=name)
        total = out["relevance"][engine.model.input_name].reshape(2, -1).sum(1) / out["start"]
        kept[name + " input"] = total
    assert (kept["epsilon-plus-flat"] < 0.8).all(), kept      # the folded shift of 2 takes its share at conv2
    np.testing.assert_allclose(kept["epsilon-plus-flat-nobias"], 1.0, atol=1e-4)
    np.testing.assert_allclose(kept["epsilon-plus-flat input"], kept["epsilon-plus-flat"], rtol=1e-3)  # only there
    np.testing.assert_allclose(kept["epsilon-plus-flat-nobias input"], 1.0, atol=1e-4)


def test_rule_map_takes_bias(tmp_path):
    comp = lrp.parse_rule_map({"extends": "epsilon-plus-flat", "rules": [{"op": "conv", "rule": "zplus",
                                                                           "bias": "zero"}]})
    path = _bn_net(tmp_path / "bn.onnx")
    rules = comp.assign(Explainer(path).model.canonical)
    assert rules["conv2"].bias == "zero"


def test_default_composite_keeps_the_logit_the_folded_shifts_absorb_on_efficientnet(shared):
    """The numbers behind the default (docs/lrp-bias.md), on one photo: epsilon-plus-flat keeps < 1e-3 of the
    logit at the input of the trained EfficientNet-Lite0, the default bias-free twin over 30x more."""
    from onnx_saliency.intake.preprocess import load_image

    ex = Explainer(shared / "models" / "efficientnet_lite0.onnx", threads=1)
    dog = load_image(shared / "images" / "darknet" / "dog.jpg")
    kept = {}
    for composite in (None, "epsilon-plus-flat"):
        r = ex.explain([dog], method="lrp", **({"composite": composite} if composite else {}))
        kept[composite] = float(r.attributions.sum() / r.scores[0])
        assert r.options["composite"] == (composite or lrp.DEFAULT_COMPOSITE)
    assert kept["epsilon-plus-flat"] < 1e-3
    assert kept[None] > 30 * kept["epsilon-plus-flat"] and kept[None] > 0.02
