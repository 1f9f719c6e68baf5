"""What the commands print besides results: nothing from onnxruntime itself, one line per error, aligned and
whole method descriptions, help that leads somewhere, and torch module paths for dynamo exports."""

import json
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_saliency.cli.main import main
from tests.graphs import tiny_classifier


def _cli(*args, **kw):
    """The CLI in a child process: onnxruntime logs to the process's stderr, below Python's sys.stderr."""
    return subprocess.run([sys.executable, "-m", "onnx_saliency.cli.main", *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=300, **kw)


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    return folder


def _with_nodes(path, before: str, nodes, inits=(), rewire=None):
    """Insert `nodes` before node `before` and feed `rewire` = (node, input index, tensor)."""
    m = onnx.load(str(path))
    g = m.graph
    g.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in inits)
    at = next(i for i, n in enumerate(g.node) if n.name == before)
    for k, n in enumerate(nodes):
        g.node.insert(at + k, n)
    if rewire:
        node, index, tensor = rewire
        next(n for n in g.node if n.name == node).input[index] = tensor
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def test_onnxruntime_optimiser_warnings_stay_off_stderr(tmp_path):
    """Two Unsqueezes of one initializer make onnxruntime's optimiser warn while onnx-graphsurgeon folds
    them (Swin-T printed 104 such lines before its error)."""
    path = _with_nodes(tiny_classifier(tmp_path / "warn.onnx"), "gap", [
        helper.make_node("Unsqueeze", ["scale", "axes"], ["s1"], name="unsq1"),
        helper.make_node("Unsqueeze", ["scale", "axes"], ["s2"], name="unsq2"),
        helper.make_node("Mul", ["s1", "s2"], ["s12"], name="mul_s"),
        helper.make_node("Mul", ["a2", "s12"], ["a2s"], name="scale_a2")],
        [("scale", np.linspace(0.9, 1.1, 8).astype(np.float32)), ("axes", np.array([1, 2], np.int64))],
        rewire=("gap", 0, "a2s"))
    done = _cli("layers", path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_a_failing_run_is_reported_once(tmp_path, images):
    """A Reshape to a hard-coded (1, -1) fails inside onnxruntime for two images; onnxruntime's own error
    line must not repeat ours (audit printed its error twice)."""
    path = _with_nodes(tiny_classifier(tmp_path / "fixed.onnx"), "flatten",
                       [helper.make_node("Reshape", ["g", "one_row"], ["f1"], name="fixed_reshape")],
                       [("one_row", np.array([1, -1], np.int64))], rewire=("fc", 0, "f1"))
    done = _cli("audit", path, path, images, "--out", tmp_path / "audit")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: onnxruntime failed on fixed.onnx"), done.stderr


def test_methods_are_aligned_and_described_in_whole_sentences():
    import inspect

    from onnx_saliency.methods import METHODS

    code, text = _run("methods")
    assert code == 0
    lines = [line for line in text.splitlines() if line.strip()]
    width = max(map(len, METHODS)) + 2
    described = {}
    current = None
    for line in lines:
        if line.startswith("aliases:") or line.startswith("  "):
            if line.strip().startswith("options:"):  # the declared options follow the description
                current = None
                continue
            if current is not None and line.startswith(" " * width + " " * 7):  # a wrapped description
                described[current] += " " + line.strip()
                continue
            current = None
            continue
        name = line.split()[0]
        assert name in METHODS, line
        assert line[width:width + 5].strip() in ("layer", "pixel", "attn") and line[width - 1] == " ", line  # one column
        described[name] = line[width + 7:].strip()
        current = name
    assert set(described) == set(METHODS)
    for name, text in described.items():
        first = " ".join(inspect.cleandoc(METHODS[name].__doc__).split("\n\n")[0].split())
        assert text == first, name
        assert text.endswith((".", ")")), (name, text)  # never cut mid-sentence
    assert "rule" in described["lrp"] and "relevance" in described["lrp"]


def test_the_composites_are_listed_where_explain_points():
    from onnx_saliency.lrp import COMPOSITES

    code, text = _run("explain", "--help")
    assert "--composite" in text
    code, rules_help = _run("rules", "--help")
    flat = " ".join(rules_help.split()).replace("- ", "-")  # Click may wrap a long name at its hyphen
    for name in COMPOSITES:
        assert name in flat, name


SCOPES = {"conv1": "['', 'features', 'features.0', 'conv2d']", "relu1": "['', 'features', 'features.act', 'relu']",
          "pool": "['', 'features', 'features.pool', 'max_pool2d']",
          "conv2": "['', 'features', 'features.2', 'conv2d_1']",
          "relu2": "['', 'features', 'features.act', 'relu_1']", "gap": "['', 'mean']",
          "fc": "['', 'head', 'linear']"}


def _dynamo_like(path):
    """tiny_classifier with the node metadata torch's dynamo exporter writes; one ReLU module called twice."""
    tiny_classifier(path)
    m = onnx.load(str(path))
    for node in m.graph.node:
        if node.name in SCOPES:
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=SCOPES[node.name])
            node.name = {"conv1": "node_conv2d", "relu1": "node_relu", "conv2": "node_conv2d_1",
                         "relu2": "node_relu_1"}.get(node.name, node.name)
    onnx.save(m, str(path))
    return path


def test_module_paths_of_dynamo_exports_in_layers_sidecars_and_layer_specs(tmp_path, images):
    from onnx_saliency import Explainer

    path = _dynamo_like(tmp_path / "dynamo_like.onnx")
    code, text = _run("layers", path)
    assert code == 0, text
    rows = [line.split("\t") for line in text.strip().splitlines()]
    assert rows[0] == ["tensor", "node", "op", "shape", "module"]
    modules = {r[1]: r[4] for r in rows[1:]}
    assert modules["node_conv2d"] == "features.0" and modules["node_relu_1"] == "features.act"
    ex = Explainer(path)
    assert ex.resolve_layer("features.2") == "c2"
    assert ex.resolve_layer("features.act") == "a2"  # a module called twice: its last call, as a torch hook sees
    assert ex.resolve_layer("features") == "a2"      # a container: its last spatial output
    out = tmp_path / "out"
    code, text = _run("explain", path, images, "--layer", "features.act", "--out", out)
    assert code == 0, text
    meta = json.loads((out / "img0" / "gradcam.json").read_text())
    assert meta["layers"] == ["a2"] and meta["layer_modules"] == ["features.act"]
    code, text = _run("explain", path, images, "--layer", "nothere.relu", "--out", out)
    assert code == 2 and "no such tensor, node or module" in text


@pytest.mark.parity
def test_module_paths_of_a_real_dynamo_export(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import contextlib
    import io
    import warnings

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                                torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU())
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    path = tmp_path / "net.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(1, 3, 12, 12),), str(path), dynamo=True)
    code, text = _run("layers", path, "--preset", "raw")
    assert code == 0, text
    rows = [line.split("\t") for line in text.strip().splitlines()]
    assert rows[0][4] == "module"
    assert [r[4] for r in rows[1:]] == ["features.0", "features.1", "features.2", "features.3"]
    from onnx_saliency import Explainer

    ex = Explainer(path, preset="raw")
    assert ex.resolve_layer("features.2") == rows[3][0] and ex.resolve_layer("features") == rows[4][0]
