"""`onnx-saliency audit`: two exports of one network agree; a perturbed or re-spelled one is located."""

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from onnx_saliency.audit import Tolerances, audit, pearson, top_iou
from onnx_saliency.cli.main import main
from onnx_saliency.errors import SaliencyError
from tests.twins import save, to_fp16_weights, twin_a, twin_b, weights


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("twins")
    w = weights()
    perturbed = {**w, "w2": w["w2"].copy()}
    perturbed["w2"][2, 3, 1, 1] += 0.8
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = folder / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
        images.append(path)
    return {"a": save(twin_a(w), folder / "a.onnx"), "b": save(twin_b(w), folder / "b.onnx"),
            "perturbed": save(twin_b(perturbed), folder / "b_perturbed.onnx"),
            "mean": save(twin_b(w, pool="ReduceMean"), folder / "b_mean.onnx"),
            "fp16": save(to_fp16_weights(twin_a(w)), folder / "a_fp16.onnx"),
            "images": images, "folder": folder}


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_twin_exports_agree_with_maps_and_layers_side_by_side(twins):
    r = audit(twins["a"], twins["b"], twins["images"], ["gradcam", "lrp"])
    assert r.agree, r.failures
    for method in ("gradcam", "lrp"):
        rows = r.explanations[method]["per_image"]
        assert len(rows) == 2 and all(row["pearson"] >= 0.999 for row in rows), rows
        assert all(row["ssim"] > 0.99 and row["iou_top10"] > 0.9 for row in rows)
    pairs = {p.a.name: p for p in r.pairs}
    # NHWC + Transpose, bias-less Conv + Add + Sub/Mul/Add, Reshape + MatMul + Add all canonicalise away
    assert {k: (p.b.name, p.basis) for k, p in pairs.items()} == {
        "conv1": ("block1/conv", "weights"), "relu1": ("block1/relu", "op"), "pool": ("block1/pool", "op"),
        "conv2": ("block2/conv", "weights"), "relu2": ("block2/relu", "op"), "gap": ("head/gap", "op"),
        "fc": ("head/matmul", "weights")}
    assert all(p.weight_diff < 1e-5 for p in r.pairs if p.weight_diff is not None)
    assert all(p.cam_r > 0.999 for p in r.pairs if p.cam_r is not None)
    assert r.explanations["gradcam"]["layer_b"] == "y2" and not r.unmatched_b


def test_cli_twin_exit_0_writes_json_and_self_contained_html(twins, tmp_path):
    out = tmp_path / "audit"
    code, text = _run("audit", twins["a"], twins["b"], *twins["images"], "-m", "gradcam", "-m", "lrp",
                      "--out", out, "--report")
    assert code == 0, text
    assert "verdict: AGREE" in text and "first diverging layer: none" in text
    assert "rewrite B  MatMul head/matmul + Add head/bias -> Gemm head/matmul" in text
    data = json.loads((out / "audit.json").read_text())
    assert data["agree"] is True and set(data["explanations"]) == {"gradcam", "lrp"}
    assert data["structure"]["pairs"][0]["b_node"] == "block1/conv"
    page = (out / "audit.html").read_text()
    # per image: the input, then for each method A, B and their difference, all inline
    assert page.count("data:image/png;base64,") == 2 * (1 + 2 * 3) and "src='http" not in page


def test_perturbed_conv_weight_exits_1_and_names_the_first_diverging_layer(twins, tmp_path):
    code, text = _run("audit", twins["a"], twins["perturbed"], *twins["images"], "-m", "gradcam",
                      "--out", tmp_path / "audit")
    assert code == 1, text
    assert "first diverging layer: conv2 <-> block2/conv (weights differ" in text
    assert "verdict: DIFFER" in text
    data = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert data["structure"]["first_diverging_layer"]["a_node"] == "conv2"
    before = [p for p in data["structure"]["pairs"] if p["a_node"] in ("conv1", "relu1", "pool")]
    assert all(p["activation_rel_diff"] < 1e-5 for p in before)  # the layers before it still agree


def test_a_differently_spelled_op_is_paired_by_its_activations(twins):
    r = audit(twins["a"], twins["mean"], twins["images"][:1], ["gradcam"])
    gap = next(p for p in r.pairs if p.a.name == "gap")
    assert (gap.b.name, gap.basis) == ("head/mean", "activation")
    assert gap.activation_diff < 1e-5 and r.agree, r.failures


def test_fp16_weight_copy_reports_map_agreement(twins, tmp_path):
    code, text = _run("audit", twins["a"], twins["fp16"], *twins["images"], "-m", "gradcam", "-m", "lrp",
                      "--out", tmp_path / "audit")
    assert code in (0, 1), text
    data = json.loads((tmp_path / "audit" / "audit.json").read_text())
    for method in ("gradcam", "lrp"):
        for row in data["explanations"][method]["per_image"]:
            assert np.isfinite([row["pearson"], row["ssim"], row["iou_top10"]]).all()
    weights_diff = [p["weight_rel_diff"] for p in data["structure"]["pairs"] if p["weight_rel_diff"] is not None]
    assert 0 < max(weights_diff) < 1e-3  # fp16 rounding: visible, and small


def test_tolerances_and_usage_errors(twins, tmp_path):
    assert Tolerances.parse(["pearson=0.5", "layer-cam=0"]).layer_cam == 0
    with pytest.raises(SaliencyError, match="--tolerance 'bogus=1'"):
        Tolerances.parse(["bogus=1"])
    code, text = _run("audit", twins["a"], twins["b"], *twins["images"], "--tolerance", "pearson=abc")
    assert code == 2 and "error: --tolerance 'pearson=abc'" in text
    code, text = _run("audit", twins["a"], twins["b"], *twins["images"], "-m", "nope")
    assert code == 2 and "unknown method" in text


def test_agreement_measures():
    rng = np.random.default_rng(0)
    m = rng.random((12, 12))
    assert pearson(m, m) == pytest.approx(1.0) and pearson(m, -m) == pytest.approx(-1.0)
    assert pearson(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0 and pearson(np.zeros((4, 4)), m[:4, :4]) == 0.0
    assert top_iou(m, m) == 1.0
    shifted = np.roll(m, 6, axis=0)
    assert top_iou(m, shifted) < 0.5


@pytest.mark.shared
def test_efficientnet_folded_and_unfolded_audit_as_equal(shared, tmp_path):
    models = shared / "models"
    code, text = _run("audit", models / "efficientnet_lite0.onnx", models / "efficientnet_lite0_bn.onnx",
                      shared / "images" / "darknet" / "eagle.jpg", "-m", "gradcam", "--out", tmp_path / "audit",
                      "--threads", 2)
    assert code == 0, text
    data = json.loads((tmp_path / "audit" / "audit.json").read_text())
    pairs = data["structure"]["pairs"]
    assert len(pairs) > 90 and all(p["matched_by"] in ("weights", "op") for p in pairs)
    assert data["explanations"]["gradcam"]["per_image"][0]["pearson"] > 0.9999
