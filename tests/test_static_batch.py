"""Models whose input has a static batch (plain torch exports without dynamic axes have batch 1): every run is
chunked to that batch (padded where the last chunk is short), in every command and method, without asking."""

import json

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_saliency import Explainer
from onnx_saliency.cli.main import main
from onnx_saliency.errors import SaliencyError
from tests.graphs import make_model

CLASSES, SIZE = 4, 16


def static_classifier(path, batch: int | None, reshape: bool = True):
    """conv-relu-maxpool-conv-relu-GAP-(Reshape to [batch, -1] | Flatten)-Gemm with input (batch, 3, 16, 16);
    batch None gives the same network with a dynamic batch (the reference)."""
    rng = np.random.default_rng(0)
    head = (helper.make_node("Reshape", ["g", "shape"], ["f"], name="reshape") if reshape and batch
            else helper.make_node("Flatten", ["g"], ["f"], name="flatten"))
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"], name="gap"),
        head,
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="fc"),
    ]
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
             "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
             "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
             "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
             "fc": rng.standard_normal((CLASSES, 8)).astype(np.float32)}
    if reshape and batch:
        inits["shape"] = np.array([batch, -1], np.int64)
    model = make_model(nodes, [("input", (batch, 3, SIZE, SIZE))], [("logits", (batch, CLASSES))], inits)
    for key, value in {"onnx_saliency.preset": "tf", "onnx_saliency.resize": str(SIZE),
                       "onnx_saliency.crop": str(SIZE)}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    return {b: static_classifier(root / f"batch{b}.onnx", b) for b in (1, 2, None)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    return folder


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_the_static_batch_is_read_at_load(models):
    assert Explainer(models[1]).model.batch == 1
    assert Explainer(models[2]).model.batch == 2
    assert Explainer(models[None]).model.batch is None


METHODS = {"gradcam": {}, "integrated-gradients": {"steps": 5}, "smoothgrad": {"n": 3},
           "scorecam": {}, "lrp": {}, "gradient": {}}


@pytest.mark.parametrize("batch", [1, 2])
def test_every_method_matches_the_dynamic_batch_model(models, images, batch):
    """Three images through a batch-1 and a batch-2 model (the last call padded) give the maps of the same
    network with a dynamic batch, and the engine really calls the session once per `batch` images."""
    paths = sorted(images.iterdir())
    reference = Explainer(models[None])
    ex = Explainer(models[batch])
    for method, options in METHODS.items():
        want = reference.explain(paths, method=method, batch_size=16, **options)
        calls = ex.engine.calls
        got = ex.explain(paths, method=method, batch_size=16, **options)
        np.testing.assert_allclose(got.maps, want.maps, rtol=1e-4, atol=1e-5, err_msg=method)
        np.testing.assert_array_equal(got.targets, want.targets)
        assert ex.engine.calls - calls >= -(-3 // batch), method


def test_cli_explain_compare_evaluate_audit_on_a_batch_1_model(models, images, tmp_path):
    model = models[1]
    out = tmp_path / "explain"
    code, text = _run("explain", model, images, "-m", "gradcam", "-m", "integrated-gradients", "--out", out,
                      "--option", "steps=4")
    assert code == 0, text
    assert len(list(out.glob("img*/*.json"))) == 6
    code, text = _run("compare", model, images / "img0.png", "-m", "gradcam", "-m", "integrated-gradients",
                      "-o", tmp_path / "grid.png")
    assert code == 0, text
    code, text = _run("evaluate", model, images, "-m", "gradcam", "--out", tmp_path / "eval", "--step", "64")
    assert code == 0, text
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert rows  # the metrics ran on perturbation batches of 64 images, 1 per call
    code, text = _run("audit", model, models[None], images, "--out", tmp_path / "audit")
    assert code == 0, text


def test_onnxruntime_errors_keep_the_line_that_explains_them(models):
    """onnxruntime's message spans lines; the one that says which dimension is wrong must not be cut."""
    ex = Explainer(models[1])
    with pytest.raises(SaliencyError) as err:
        ex.engine.run(np.zeros((1, 3, SIZE + 4, SIZE), np.float32))
    text = str(err.value)
    assert "Got invalid dimensions for input" in text and "Got: 20 Expected: 16" in text, text
    assert "\n" not in text


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory):
    """One small torch CNN exported by both exporters exactly as a user would, without dynamic axes."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import contextlib
    import io
    import warnings

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                                torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 16, 3, padding=1),
                                                torch.nn.ReLU())
            self.head = torch.nn.Linear(16, CLASSES)

        def forward(self, x):
            x = self.features(x)
            return self.head(x.view(x.size(0), -1, 64).mean(-1))  # view(size(0), ...): a static Reshape

    torch.manual_seed(0)
    net = Net().eval()
    root = tmp_path_factory.mktemp("torch")
    paths = {}
    for dynamo in (False, True):
        path = root / ("dynamo.onnx" if dynamo else "legacy.onnx")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=dynamo,
                              input_names=["input"], output_names=["logits"], opset_version=18)
        model = onnx.load(str(path))
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # really static
        model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="tf"))
        onnx.save(model, str(path))
        paths["dynamo" if dynamo else "legacy"] = path
    return paths


@pytest.mark.parity
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_plain_torch_exports_run_everywhere(torch_exports, images, tmp_path, exporter):
    """explain (several images, IG with its 20 steps), compare, evaluate (perturbation batches of 64)."""
    model = torch_exports[exporter]
    code, text = _run("explain", model, images, "-m", "gradcam", "-m", "integrated-gradients",
                      "--out", tmp_path / "out")
    assert code == 0, text
    assert len(list((tmp_path / "out").glob("img*/*.npy"))) == 6
    code, text = _run("compare", model, images / "img0.png", "-m", "gradcam", "-m", "smoothgrad",
                      "-o", tmp_path / "grid.png")
    assert code == 0, text
    code, text = _run("evaluate", model, images, "-m", "gradcam", "--out", tmp_path / "eval")
    assert code == 0, text
    r = Explainer(model).explain(sorted(images.iterdir()), method="integrated-gradients")
    assert r.maps.shape == (3, SIZE, SIZE) and np.isfinite(r.maps).all() and np.ptp(r.maps) > 0
