"""Metrics on a built model whose class-0 logit is the sum of the pixels inside a known box, so the best and
worst possible deletion/insertion curves, the pointing game and AD/IC have closed forms."""

import json

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_saliency import SaliencyError
from onnx_saliency.evaluation import metrics as M
from onnx_saliency.evaluation.annotations import InputRegions
from onnx_saliency.cli.main import main
from onnx_saliency.engine import Engine
from onnx_saliency.intake.model import load_model
from tests.graphs import make_model, tiny_classifier

S = 16                       # input side
BOX = (4, 3, 10, 9)          # x0, y0, x1, y1 (pixels 4..9 x 3..8)
GAIN = 0.05                  # logit per unit of pixel value inside the box, per channel


@pytest.fixture(scope="module")
def box_engine(tmp_path_factory):
    """logits = [s, -s] with s = GAIN * sum of input * box mask: p(class 0) = sigmoid(2 s)."""
    x0, y0, x1, y1 = BOX
    mask = np.zeros((1, 3, S, S), np.float32)
    mask[..., y0:y1, x0:x1] = GAIN
    nodes = [helper.make_node("Mul", ["input", "mask"], ["masked"], name="mul"),
             helper.make_node("ReduceSum", ["masked", "axes"], ["s"], keepdims=1, name="sum"),
             helper.make_node("Flatten", ["s"], ["f"], name="flatten"),
             helper.make_node("Mul", ["f", "sign"], ["logits"], name="logits")]
    model = make_model(nodes, [("input", (None, 3, S, S))], [("logits", (None, 2))],
                       {"mask": mask, "axes": np.array([1, 2, 3], np.int64), "sign": np.array([[1, -1]], np.float32)})
    path = tmp_path_factory.mktemp("box") / "box.onnx"
    onnx.save(model, path)
    return Engine(load_model(path))


def _box_map():
    m = np.zeros((S, S), np.float32)
    x0, y0, x1, y1 = BOX
    m[y0:y1, x0:x1] = 1
    return m


def _regions(n):
    return [InputRegions(np.array([BOX], float), None, True, (S, S))] * n


def _analytic_auc(kind: str, order: str, step: int) -> float:
    """AUC when the box pixels change first ('best' for deletion) or last, image of ones, zero baseline."""
    area = (BOX[2] - BOX[0]) * (BOX[3] - BOX[1])
    counts = np.minimum(np.arange(-(-S * S // step) + 1) * step, S * S)
    box_changed = np.minimum(counts, area) if order == "box first" else np.maximum(0, counts - (S * S - area))
    box_on = area - box_changed if kind == "deletion" else box_changed
    p = 1 / (1 + np.exp(-2 * GAIN * 3 * box_on))
    f = counts / (S * S)
    return float(((p[1:] + p[:-1]) / 2 * np.diff(f)).sum())


@pytest.mark.parametrize("step", [4, 7])  # 7 does not divide 256: a shorter last step
def test_box_map_is_best_and_inverted_map_worst_for_deletion_and_insertion(box_engine, step):
    rng = np.random.default_rng(0)
    box = _box_map()
    maps = np.stack([box, 1 - box] + [rng.random((S, S), dtype=np.float32) for _ in range(4)])
    x = np.ones((len(maps), 3, S, S), np.float32)
    curves = M.perturbation_curves(box_engine, x, maps, np.zeros(len(maps), np.int64), step=step,
                                   deletion_baseline="zero", insertion_baseline="zero", batch_size=40)
    dele, ins = curves["deletion"].auc, curves["insertion"].auc
    assert dele[0] == pytest.approx(_analytic_auc("deletion", "box first", step), abs=1e-6)
    assert dele[1] == pytest.approx(_analytic_auc("deletion", "box last", step), abs=1e-6)
    assert ins[0] == pytest.approx(_analytic_auc("insertion", "box first", step), abs=1e-6)
    assert ins[1] == pytest.approx(_analytic_auc("insertion", "box last", step), abs=1e-6)
    assert (dele[0] < dele[2:]).all() and (dele[2:] < dele[1]).all()
    assert (ins[0] > ins[2:]).all() and (ins[2:] > ins[1]).all()
    c = curves["deletion"]
    assert c.probabilities.shape == (len(maps), len(c.fractions)) and c.fractions[-1] == 1.0
    assert c.probabilities[:, 0] == pytest.approx(1 / (1 + np.exp(-2 * GAIN * 3 * 36)))  # step 0: the clean image


def test_pointing_game_energy_and_localization_on_the_box(box_engine):
    box = _box_map()
    near = np.zeros((S, S), np.float32)
    near[5, 13] = 1  # pixel centre (13.5, 5.5): 3.5 px right of the box edge x1 = 10
    maps = np.stack([box, 1 - box, near, np.full((S, S), 0.3, np.float32)])
    regions = _regions(len(maps))
    assert M.pointing_game(maps, regions, tolerance=1).tolist() == [1, 0, 0, 0]
    assert M.pointing_game(maps[2:3], regions[:1], tolerance=3.5).tolist() == [1]
    assert M.pointing_game(maps[2:3], regions[:1], tolerance=3.4).tolist() == [0]
    energy = M.energy_pointing_game(maps, regions)
    assert energy[:3].tolist() == [1.0, 0.0, 0.0]
    assert energy[3] == pytest.approx(36 / 256)  # a constant map spreads evenly
    iou, boxes = M.localization(maps, regions, threshold=0.15)
    assert iou[0] == 1.0 and boxes[0].tolist() == list(BOX)
    assert iou[1] == pytest.approx(36 / 256)  # the complement's component boxes the whole image
    assert iou[3] == 0.0  # constant: nothing above the threshold
    checker = np.indices((S, S)).sum(0) % 2
    signed = _box_map() - 0.8 * (1 - _box_map()) * checker  # outside: 0 or evidence against the class
    assert M.energy_pointing_game(signed[None], regions[:1])[0] == 1.0  # negative evidence is not "energy"
    assert M.localization(signed[None], regions[:1])[0][0] == 1.0
    mask = np.zeros((S, S), bool)
    mask[3:9, 4:10] = True
    with_mask = [InputRegions(np.zeros((0, 4)), mask, True, (S, S))] * 2
    assert M.pointing_game(maps[[0, 2]], with_mask, tolerance=3).tolist() == [1, 0]
    assert M.pointing_game(maps[[0, 2]], with_mask, tolerance=4).tolist() == [1, 1]


def test_constant_maps_are_flagged():
    maps = np.stack([np.full((8, 8), 2.0), _box_map()[:8, :8] + 5, np.zeros((8, 8)), np.full((8, 8), -1e-3)])
    assert M.constant_maps(maps).tolist() == [True, False, True, True]


def test_average_drop_and_increase_in_confidence(box_engine):
    box = _box_map()
    maps = np.stack([box, 1 - box])
    ones = np.ones((2, 3, S, S), np.float32)
    signed = box.copy() - (1 - box)
    signed[:, 7:] = np.where(box[:, 7:] > 0, 0, -1)  # the right half of the box (x 7..9) has value 0
    r = M.confidence_change(box_engine, ones[:1], signed[None], [0])
    half = 1 / (1 + np.exp(-2 * GAIN * 3 * 18))  # a signed map weights by its positive part: 0 stays 0
    assert r["o"][0] == pytest.approx(half)
    r = M.confidence_change(box_engine, ones, maps, [0, 0])
    y = 1 / (1 + np.exp(-2 * GAIN * 3 * 36))
    assert r["average_drop"] == pytest.approx([0, 100 * (y - 0.5) / y], abs=1e-6)
    assert r["increase_confidence"].tolist() == [0, 0]
    # a negative box: masking it out raises the class-0 probability to 0.5
    r = M.confidence_change(box_engine, -ones, maps, [0, 0])
    assert r["average_drop"].tolist() == [0, 0] and r["increase_confidence"].tolist() == [0, 100]
    # Relevance-CAM: top 50 %, pixel space (black = -1 here); no drop -> NaN, ties count as increases
    r = M.confidence_change(box_engine, ones, maps, [0, 0], variant="relevance-cam", pixel_zero=[-1, -1, -1])
    assert r["keep"] == 0.5 and r["space"] == "pixel"
    assert np.isnan(r["average_drop"][0]) and r["increase_confidence"][0] == 100
    o = 1 / (1 + np.exp(2 * GAIN * 3 * 36))  # the box went black (-1)
    assert r["average_drop"][1] == pytest.approx(100 * (y - o) / y) and r["increase_confidence"][1] == 0


def test_metrics_are_batched_across_images_and_steps(box_engine):
    n, step, batch = 5, 8, 50
    rng = np.random.default_rng(1)
    x = rng.random((n, 3, S, S), dtype=np.float32)
    maps = rng.random((n, S, S), dtype=np.float32)
    before = box_engine.calls
    M.perturbation_curves(box_engine, x, maps, np.zeros(n, np.int64), step=step, batch_size=batch)
    jobs = n * 2 * (S * S // step + 1)  # images x (deletion, insertion) x (steps + 1)
    assert box_engine.calls - before == -(-jobs // batch)  # 7 calls instead of 330 single-image runs
    before = box_engine.calls
    M.confidence_change(box_engine, x, maps, None, batch_size=batch)  # targets resolved once: +1 call
    assert box_engine.calls - before == 1 + 1


def test_baselines_and_bad_inputs(box_engine):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, S, S)).astype(np.float32)
    blur = M.baseline_images(x, "blur")
    expected = cv2.GaussianBlur(np.ascontiguousarray(x[1].transpose(1, 2, 0)), (11, 11), 5)
    assert np.array_equal(blur[1], expected.transpose(2, 0, 1))
    assert np.allclose(M.baseline_images(x, "mean")[0, 2], x[0, 2].mean())
    with pytest.raises(SaliencyError, match="baseline 'noise'"):
        M.baseline_images(x, "noise")
    with pytest.raises(SaliencyError, match="do not match"):
        M.deletion(box_engine, x, np.zeros((2, 8, 8)), step=8)
    with pytest.raises(SaliencyError, match="NaN"):
        M.insertion(box_engine, x, np.full((2, S, S), np.nan), step=8)
    with pytest.raises(SaliencyError, match="ad-variant"):
        M.confidence_change(box_engine, x, np.zeros((2, S, S)), variant="score-cam")


# ---------------------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture()
def tiny(tmp_path):
    model = tiny_classifier(tmp_path / "tiny.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        images[f"img{i}.png"] = {"objects": [{"box": [2, 3, 9, 12], "class_index": i}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images}))
    return model, folder, ann


def test_evaluate_cli_prints_table_and_writes_csv_json_and_plots(tiny, tmp_path):
    model, folder, ann = tiny
    out = tmp_path / "eval"
    args = ["evaluate", model, folder, "-m", "gradcam", "-m", "gradient", "--metric", "deletion", "--metric",
            "insertion", "--metric", "average-drop", "--metric", "pointing-game", "--metric", "localization",
            "--metric", "sanity-cascading", "--annotations", ann, "--out", out, "--step", "32", "--tolerance", "2"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert "deletion AUC" in header and "pointing %" in header and "cascade rho" in header
    assert any(line.startswith("gradcam ") and "±" in line for line in lines)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 and rows[0].startswith("image,method,target")
    data = json.loads((out / "metrics.json").read_text())
    assert data["settings"]["step"] == 32 and len(data["per_image"]) == 6
    assert len(data["curves"]["gradient"]["deletion"]["per_image"]["img1.png"]) == 256 // 32 + 1
    assert data["sanity"]["gradcam"]["cascading"]["steps"] == [1, 2, 3]
    for png in ("deletion_curves.png", "insertion_curves.png", "sanity_gradcam_cascading.png"):
        assert cv2.imread(str(out / png)) is not None


def test_evaluate_cli_fails_cleanly(tiny, tmp_path):
    model, folder, ann = tiny
    runner = CliRunner()
    r = runner.invoke(main, ["evaluate", str(model), str(folder), "--metric", "pointing-game"])
    assert r.exit_code == 2 and "error: --metric pointing-game: needs --annotations" in r.output
    r = runner.invoke(main, ["evaluate", str(model), str(folder), "--metric", "auc"])
    assert r.exit_code == 2 and "--metric 'auc': unknown" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": {"img0.png": {"objects": [{"box": [5, 5, 1, 9]}]}}}))
    r = runner.invoke(main, ["evaluate", str(model), str(folder), "--metric", "localization",
                             "--annotations", str(bad)])
    assert r.exit_code == 2 and "bad.json" in r.output and "objects[0].box" in r.output
