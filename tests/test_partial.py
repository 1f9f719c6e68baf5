"""One failing method does not cost the others: what succeeded is written, each failure gets an `error:` line
naming the image and the method, and the exit code is 1 (partial), as for bad images."""

import json
import os

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from onnx_saliency.cli.main import main
from onnx_saliency.output.sidecar import outputs_complete
from tests.graphs import tiny_classifier

CAM_AT_A1 = ("-m cam: 'a1' is not followed by global average pooling and one linear layer; use gradcam (equal to "
             "CAM on such heads) or pick the last conv layer")


@pytest.fixture()
def setup(tmp_path):
    model = tiny_classifier(tmp_path / "tiny.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    return model, folder, sorted(folder.iterdir())


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_explain_writes_the_methods_that_work_and_reports_the_one_that_fails(setup, tmp_path):
    """CAM needs the layer before global pooling; at 'a1' it cannot run, Grad-CAM and the gradient can."""
    model, folder, images = setup
    out = tmp_path / "out"
    result = _invoke("explain", model, folder, "-m", "gradcam", "-m", "cam", "-m", "gradient", "--layer", "a1",
                     "--out", out, "--batch-size", 2)
    assert result.exit_code == 1, result.output
    errors = result.stderr.splitlines()
    assert errors == [f"error: {p}: {CAM_AT_A1}" for p in images] + [
        "error: -m cam failed on 3 of 3 image(s): img0.png, img1.png, img2.png (the other methods were written)"]
    sha = json.loads((out / "img0" / "gradcam.json").read_text())["model_sha256"]
    for p in images:
        assert outputs_complete(out, p, "gradcam", sha) and outputs_complete(out, p, "gradient", sha)
        assert sorted(os.listdir(out / p.stem)) == sorted(f"{m}.{s}" for m in ("gradcam", "gradient")
                                                           for s in ("json", "npy", "png"))
    assert result.stdout.splitlines()[-1] == f"wrote 6 of 9 output(s) (3 image(s) x 3 method(s)) to {out}"

    again = _invoke("explain", model, folder, "-m", "gradcam", "-m", "cam", "-m", "gradient", "--layer", "a1",
                    "--out", out, "--resume")
    assert again.exit_code == 1  # the finished pairs are kept, cam is tried again and fails again
    assert "3 already complete" not in again.stdout


def test_a_method_failing_everywhere_still_exits_1_and_writes_nothing(setup, tmp_path):
    model, folder, images = setup
    out = tmp_path / "out"
    result = _invoke("explain", model, folder, "-m", "cam", "--layer", "a1", "--out", out)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: 3 of 3 image(s) failed and were skipped: img0.png, img1.png, " \
                                             "img2.png"
    assert not out.exists() or not any(out.rglob("*.json"))


def test_compare_draws_the_methods_that_work(setup, tmp_path):
    model, folder, images = setup
    grid = tmp_path / "grid.png"
    result = _invoke("compare", model, images[0], "-m", "gradcam", "-m", "cam", "--layer", "a1", "-o", grid)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: {images[0]}: {CAM_AT_A1}", "error: 1 of 2 method(s) failed: cam"]
    assert cv2.imread(str(grid)) is not None
    assert "1 method(s)" in result.stdout and "cam failed" in result.stdout


def test_evaluate_scores_the_methods_that_work(setup, tmp_path):
    model, folder, images = setup
    out = tmp_path / "eval"
    result = _invoke("evaluate", model, folder, "-m", "gradcam", "-m", "cam", "--layer", "a1", "--out", out,
                     "--step", 64, "--batch-size", 2)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"error: {p}: {CAM_AT_A1}" for p in images[:2]] + [
        "error: -m cam failed and is left out of the evaluation"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"] == ["gradcam"] and metrics["failed"] == {"cam": f"{images[0]}: {CAM_AT_A1}"}
    assert {r["method"] for r in metrics["per_image"]} == {"gradcam"} and len(metrics["per_image"]) == 3
