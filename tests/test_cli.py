"""The CLI end to end on built models: outputs per image and method, and one clean line for bad input."""

import json

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_saliency.cli.main import main
from tests.graphs import tiny_classifier


@pytest.fixture()
def model(tmp_path):
    return tiny_classifier(tmp_path / "tiny.onnx")


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8))
    return folder


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_explain_writes_png_npy_json_per_image_and_method(model, images, tmp_path):
    out = tmp_path / "out"
    code, text = _run("explain", model, images, "-m", "gradcam", "-m", "integrated-gradients", "--out", out,
                      "--option", "steps=4")
    assert code == 0, text
    for i in range(3):
        for method in ("gradcam", "integrated-gradients"):
            base = out / f"img{i}" / method
            assert np.load(str(base) + ".npy").shape == (16, 16)
            meta = json.loads((base.with_suffix(".json")).read_text())
            # the 16x16 map upscaled 14x to 224 rows, under a title and the colour convention, with its bar
            assert cv2.imread(str(base) + ".png").shape == (224 + 2 * 22, *meta["picture"]["shape"][1:], 3)
            assert meta["picture"]["shape"][0] == 268 and meta["picture"]["shape"][1] > 224
            assert meta["picture"]["kind"] == {"gradcam": "cam", "integrated-gradients": "signed"}[method]
            assert meta["method"] == method and len(meta["model_sha256"]) == 64
            assert meta["execution_provider"] == "CPUExecutionProvider"
            assert {"onnxruntime", "onnx-saliency"} <= set(meta["versions"])
            # each sidecar records its own method's declared options as used, not the other methods'
            assert meta["options"].get("steps") == (4 if method == "integrated-gradients" else None)
    assert not list(out.rglob("*.tmp"))


def test_layers_and_info(model):
    code, text = _run("layers", model)
    assert code == 0 and "a2\trelu2\tRelu\tNx8x8x8\t(auto)" in text
    code, text = _run("info", model, "--report")
    assert code == 0 and "preset=tf" in text and "auto layer   a2" in text


def _assert_clean_failure(code, text, expected, out):
    assert code != 0
    lines = [l for l in text.splitlines() if l.strip()]
    assert lines == [expected], text
    assert "Traceback" not in text
    assert not out.exists() or not any(out.iterdir())


BAD_CASES = {
    "not_onnx": lambda tmp, m, imgs: ([tmp / "model.onnx", imgs], "not a readable ONNX model"),
    "truncated": lambda tmp, m, imgs: ([tmp / "cut.onnx", imgs], "not a readable ONNX model"),
    "missing_image": lambda tmp, m, imgs: ([m, tmp / "nope.png"], "nope.png: no such image file or folder"),
    "unknown_method": lambda tmp, m, imgs: ([m, imgs, "-m", "magic"], "unknown method"),
    "bad_layer": lambda tmp, m, imgs: ([m, imgs, "--layer", "zzz"], "--layer 'zzz': no such tensor, node or module"),
    "bad_target": lambda tmp, m, imgs: ([m, imgs, "--target", "99"], "--target 99: class index out of range"),
}  # a bad image is skipped, not fatal: tests/test_bad_inputs.py and tests/test_batch.py


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_nonzero_nothing_written(case, model, images, tmp_path):
    (tmp_path / "model.onnx").write_text("this is not a model")
    (tmp_path / "cut.onnx").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (tmp_path / "fake.png").write_text("not an image")
    args, expected = BAD_CASES[case](tmp_path, model, images)
    out = tmp_path / "out"
    code, text = _run("explain", *args, "--out", out)
    assert code != 0
    assert expected in text, text
    line = [l for l in text.splitlines() if l.strip()]
    assert len(line) == 1 and line[0].startswith("error: "), text
    assert not out.exists()


def test_unsupported_op_reported_with_node_names_before_running(tmp_path, images):
    node = helper.make_node("Sin", ["a1"], ["a1s"], name="weird_sine")
    path = tiny_classifier(tmp_path / "sin.onnx", extra_node=node)
    m = onnx.load(str(path))
    for n in m.graph.node:  # route the pool through the Sin node
        if n.name == "pool":
            n.input[0] = "a1s"
    onnx.save(m, str(path))
    out = tmp_path / "out"
    code, text = _run("explain", path, images, "--out", out)
    assert code != 0 and not out.exists()
    assert text.strip() == f"error: {path}: unsupported op(s) in 1 node(s): Sin (1: weird_sine)"


def test_resume_redraws_pictures_drawn_otherwise(model, images, tmp_path):
    out = tmp_path / "out"
    assert _run("explain", model, images, "-m", "gradient-x-input", "--out", out)[0] == 0
    code, text = _run("explain", model, images, "-m", "gradient-x-input", "--out", out, "--resume")
    assert code == 0 and "3 already complete" in text
    code, text = _run("explain", model, images, "-m", "gradient-x-input", "--out", out, "--resume",
                      "--clip-percentile", "90", "--blend")
    assert code == 0 and "already complete" not in text, text
    meta = json.loads((out / "img0" / "gradient-x-input.json").read_text())
    assert meta["picture"]["clip_percentile"] == 90 and meta["picture"]["blend"] is True
    code, text = _run("explain", model, images, "-m", "gradient-x-input", "--out", out, "--clip-percentile", "0")
    assert code == 2 and "error: --clip-percentile 0: must be in (0, 100]" in text
