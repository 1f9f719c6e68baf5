"""export-explainer: the written graph, run by bare onnxruntime, gives the API's maps."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnx_saliency import Explainer, __version__
from onnx_saliency.cli.main import main
from onnx_saliency.export import EXPORTABLE, export_explainer
from tests.twins import save, twin_a, twin_b, weights

TARGETS = np.array([-1, 2, 0], np.int64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    w = weights()
    return {"nchw": save(twin_a(w), folder / "a.onnx"), "nhwc": save(twin_b(w), folder / "b.onnx"),
            "folder": folder}


@pytest.fixture(scope="module")
def explainers(models):
    return {k: Explainer(models[k]) for k in ("nchw", "nhwc")}


def _bare_run(path, x, targets):
    """Only onnxruntime: what a C++/C#/JS host would do with the file."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = next(i.name for i in sess.get_inputs() if i.name != "targets")
    values = sess.run(None, {image: x, "targets": targets})
    return dict(zip([o.name for o in sess.get_outputs()], values))


def _batch(layout):
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    return x if layout == "nchw" else x.transpose(0, 2, 3, 1)  # each host feeds the model's own layout


@pytest.mark.parametrize("layout,method", [("nchw", m) for m in EXPORTABLE] +
                         [("nhwc", m) for m in ("gradcam", "lrp", "gradient-x-input")])
def test_exported_graph_reproduces_the_api(models, explainers, layout, method, tmp_path):
    ex = explainers[layout]
    path = tmp_path / "explain.onnx"
    export_explainer(ex, path, method)
    x = _batch(layout)
    out = _bare_run(path, x, TARGETS)
    api = ex.explain(x, method=method, target=[int(t) for t in TARGETS])
    assert out["saliency_map"].shape == api.maps.shape == (3, 16, 16)
    np.testing.assert_allclose(out["saliency_map"], api.maps, rtol=1e-4, atol=1e-5 * np.abs(api.maps).max())
    np.testing.assert_array_equal(out["target_class"], api.targets)
    np.testing.assert_allclose(out["target_score"], api.scores, rtol=1e-5, atol=1e-6)
    original = ex.model.output_name
    reference = ort.InferenceSession(str(models[layout]), providers=["CPUExecutionProvider"]).run(None, {
        ex.model.input_name: x})[0]
    np.testing.assert_allclose(out[original], reference, rtol=1e-5, atol=1e-6)  # original outputs kept
    if api.attributions is not None:
        attributions = api.attributions if layout == "nchw" else api.attributions.transpose(0, 2, 3, 1)
        np.testing.assert_allclose(out["attributions"], attributions, rtol=1e-4, atol=1e-6)


def test_grad_cam_map_is_computed_by_onnx_nodes_and_metadata_records_it(explainers, tmp_path):
    path = tmp_path / "explain.onnx"
    export_explainer(explainers["nchw"], path, "gradcam", ["relu2"])
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"ReduceMean", "ReduceSum", "Relu", "Resize", "ReduceMin", "ReduceMax"} <= ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["onnx_saliency.explain.method"] == "gradcam"
    assert meta["onnx_saliency.explain.layers"] == "a2"
    assert meta["onnx_saliency.explain.package_version"] == __version__
    assert meta["onnx_saliency.preset"] == "tf"
    assert [i.name for i in model.graph.input] == ["input", "targets"]
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_no_resize_gives_the_raw_layer_map_and_several_layers_combine(explainers, tmp_path):
    ex = explainers["nchw"]
    x = _batch("nchw")
    export_explainer(ex, tmp_path / "raw.onnx", "gradcam", ["relu2"], resize=False)
    raw = _bare_run(tmp_path / "raw.onnx", x, TARGETS)["saliency_map"]
    api = ex.explain(x, method="gradcam", layer="relu2", target=[int(t) for t in TARGETS])
    assert raw.shape == api.raw.shape == (3, 8, 8)
    np.testing.assert_allclose(raw, api.raw, rtol=1e-5, atol=1e-6)
    export_explainer(ex, tmp_path / "two.onnx", "layercam", ["relu1", "relu2"])
    two = _bare_run(tmp_path / "two.onnx", x, TARGETS)["saliency_map"]
    api = ex.explain(x, method="layercam", layer=["relu1", "relu2"], target=[int(t) for t in TARGETS])
    np.testing.assert_allclose(two, api.maps, rtol=1e-4, atol=1e-5)


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_export_then_info_recognises_the_explain_graph(models, tmp_path):
    out = tmp_path / "explain.onnx"
    code, text = _run("export-explainer", models["nhwc"], "--method", "lrp", "-o", out, "--report")
    assert code == 0, text
    assert "rewrite  absorbed NHWC input transpose to_nchw" in text
    assert "inputs image, targets; outputs probs, target_class, target_score, saliency_map, attributions" in text
    code, text = _run("info", out)
    assert code == 0, text
    assert ("explain graph: method=lrp, outputs=probs,target_class,target_score,saliency_map,attributions"
            in text)
    code, text = _run("info", models["nhwc"])
    assert code == 0 and "explain graph" not in text


def test_cli_refuses_methods_that_need_several_passes(models, tmp_path):
    code, text = _run("export-explainer", models["nchw"], "-m", "scorecam", "-o", tmp_path / "x.onnx")
    assert code == 2 and text.startswith("error: --method scorecam: cannot be exported")
    assert not (tmp_path / "x.onnx").exists()


def test_report_flag_on_layers_and_rules(models):
    for command in ("layers", "rules"):
        code, text = _run(command, models["nhwc"], "--report")
        assert code == 0, text
        assert "rewrite  Reshape head/reshape -> Flatten(axis=1)" in text
