"""What was assumed is said, on stderr and in the sidecar: default preprocessing for an unknown model, the
embedded demo model when no model is given, labels of known models; a missing model file is named as such."""

import json

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnx_saliency.models as known_models
from onnx_saliency.cli.main import main
from tests.graphs import tiny_classifier


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "dog.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    return path


def _bare(path, classes=4):
    """tiny_classifier without its onnx_saliency.* metadata: a model we know nothing about."""
    tiny_classifier(path, classes=classes)
    m = onnx.load(str(path))
    del m.metadata_props[:]
    onnx.save(m, str(path))
    return path


def test_unknown_model_gets_torchvision_preprocessing_and_says_so(tmp_path, image):
    model = _bare(tmp_path / "mystery.onnx")
    out = tmp_path / "out"
    result = _invoke("explain", model, image, "--out", out)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "mystery.onnx" in notes[0] and "assuming torchvision preprocessing" in notes[0]
    assert "--preset" in notes[0]
    meta = json.loads((out / "dog" / "gradcam.json").read_text())
    assert meta["assumptions"] == [notes[0].removeprefix("note: ")]

    quiet = _invoke("explain", model, image, "--out", tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert json.loads((tmp_path / "quiet" / "dog" / "gradcam.json").read_text())["assumptions"] == meta["assumptions"]

    told = _invoke("explain", model, image, "--out", tmp_path / "told", "--preset", "tf")
    assert told.exit_code == 0 and told.stderr == ""
    assert json.loads((tmp_path / "told" / "dog" / "gradcam.json").read_text())["assumptions"] == []


def test_a_photo_without_a_model_warns_that_the_demo_model_is_used(tmp_path, image):
    out = tmp_path / "out"
    result = _invoke("explain", image, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    warning = result.stderr.splitlines()[0]
    assert warning.startswith("warning: no model given: ") and "embedded" in warning and "64x64" in warning
    assert "circle, square, triangle, cross, star" in warning  # what it can possibly answer
    meta = json.loads((out / "dog" / "gradcam.json").read_text())
    assert meta["assumptions"][0] == warning.removeprefix("warning: ")

    demo = _invoke("explain", "--out", tmp_path / "demo")  # the README's first command: only a note
    assert demo.exit_code == 0, demo.output
    assert not any(line.startswith("warning:") for line in demo.stderr.splitlines())
    assert any(line.startswith("note: no model given: ") for line in demo.stderr.splitlines())


@pytest.mark.parametrize("command", ["explain", "compare", "evaluate"])
def test_a_missing_model_file_is_named(tmp_path, command):
    result = _invoke(command, tmp_path / "nothere.onnx", "--out" if command != "compare" else "-o",
                     tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'nothere.onnx'}: no such model file"
    assert not (tmp_path / "out").exists()


def _pretend_known(monkeypatch, model_path, entry):
    sha = known_models.sha256_file(model_path)
    real = known_models.lookup
    monkeypatch.setattr(known_models, "lookup", lambda s: dict(entry, sha256=sha) if s == sha else real(s))


ENTRY = {"preset": "tf", "resize": 16, "crop": 16, "resize_mode": "shorter", "layout": "NCHW",
         "default_layer": None, "output": "logits"}


def test_known_models_carry_their_labels_where_they_may(tmp_path, image, monkeypatch):
    model = _bare(tmp_path / "nsfw_like.onnx", classes=2)
    _pretend_known(monkeypatch, model, dict(ENTRY, name="open_nsfw", labels="nsfw2"))
    out = tmp_path / "out"
    result = _invoke("explain", model, image, "--out", out, "--target", "NSFW")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "dog" / "gradcam.json").read_text())["target"]["label"] == "NSFW"


def test_imagenet_label_without_labels_says_how_to_get_them(tmp_path, image, monkeypatch):
    model = _bare(tmp_path / "imagenet_like.onnx", classes=1000)
    _pretend_known(monkeypatch, model, dict(ENTRY, name="squeezenet1_1", labels="imagenet"))
    result = _invoke("explain", model, image, "--out", tmp_path / "out", "--target", "malamute")
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith("error: --target 'malamute': squeezenet1_1 is an ImageNet-1k model"), line
    assert "--labels" in line and "imagenet_classes.txt" in line and "shared/labels" in line
    assert _invoke("explain", model, image, "--out", tmp_path / "out", "--target", "249").exit_code == 0


@pytest.mark.shared
def test_real_known_models(shared, tmp_path):
    photo = shared / "images" / "skimage" / "chelsea.png"
    out = tmp_path / "out"
    result = _invoke("explain", shared / "models" / "open_nsfw.onnx", photo, "--out", out)
    assert result.exit_code == 0 and result.stderr == "", result.output
    meta = json.loads((out / "chelsea" / "gradcam.json").read_text())
    assert meta["target"]["label"] == "SFW" and meta["assumptions"] == []
    result = _invoke("explain", shared / "models" / "squeezenet1_1.onnx", photo, "--target", "malamute",
                     "--out", out)
    assert result.exit_code == 2 and "--labels" in result.output
    labels = shared / "labels" / "imagenet_classes.txt"
    result = _invoke("explain", shared / "models" / "squeezenet1_1.onnx", photo, "--target", "malamute",
                     "--labels", labels, "--out", out)
    assert result.exit_code == 0, result.output
