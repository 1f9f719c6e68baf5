"""export-explainer --triton: the model repository's config.pbtxt agrees with the explain graph it serves.

No Triton server here: the config is parsed with a small protobuf text-format reader, checked field by field
against the ONNX graph's inputs and outputs, and the graph is then run the way Triton would feed it (a batch
of requests stacked on the first dimension, [B, 1] targets reshaped to [B]) to check every output's shape."""

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnx_saliency.cli.main import main
from onnx_saliency.scale.triton import triton_config
from tests.graphs import tiny_classifier

NUMPY = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_FP16": np.float16}
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}
MODEL_CONFIG_FIELDS = {"name", "backend", "platform", "max_batch_size", "input", "output", "instance_group",
                       "dynamic_batching", "version_policy", "parameters"}
TENSOR_FIELDS = {"name", "data_type", "dims", "reshape", "format", "optional"}


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]} (messages as dicts, lists flattened); raises on bad syntax."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|[A-Za-z_][A-Za-z0-9_.]*|[{}\[\]:,]|\S', text)
    pos = 0

    def take(expected=None):
        nonlocal pos
        tok = tokens[pos]
        if expected is not None and tok != expected:
            raise ValueError(f"expected {expected!r} at token {pos}, got {tok!r}")
        pos += 1
        return tok

    def scalar(tok):
        if tok.startswith('"'):
            return tok[1:-1]
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", tok):
            return tok  # an enum value
        raise ValueError(f"not a scalar: {tok!r}")

    def value():
        if tokens[pos] == "{":
            take("{")
            return message("}")
        return scalar(take())

    def message(end):
        fields: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            name = take()
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                raise ValueError(f"bad field name {name!r}")
            if tokens[pos] == ":":
                take(":")
            if tokens[pos] == "[":
                take("[")
                items = []
                while tokens[pos] != "]":
                    items.append(value())
                    if tokens[pos] == ",":
                        take(",")
                take("]")
                fields.setdefault(name, []).extend(items)
            else:
                fields.setdefault(name, []).append(value())
        if end is not None:
            take(end)
        return fields

    parsed = message(None)
    assert pos == len(tokens)
    return parsed


def _graph_dims(vi):
    return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]


def check_repository(folder: Path, batch: int = 3) -> dict:
    config = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert set(config) <= MODEL_CONFIG_FIELDS, set(config) - MODEL_CONFIG_FIELDS
    graph = onnx.load(str(folder / "1" / "model.onnx"))
    onnx.checker.check_model(graph)
    assert config["name"] == [folder.name] and config["backend"] == ["onnxruntime"]
    max_batch = config["max_batch_size"][0]
    batched = max_batch > 0
    assert ("dynamic_batching" in config) == batched
    assert config["instance_group"][0]["kind"][0] in ("KIND_CPU", "KIND_GPU")
    feeds = {}
    for section, values in (("input", graph.graph.input), ("output", graph.graph.output)):
        declared = {t["name"][0]: t for t in config[section]}
        assert list(declared) == [v.name for v in values], section
        for vi in values:
            t = declared[vi.name]
            assert set(t) <= TENSOR_FIELDS, set(t) - TENSOR_FIELDS
            assert t["data_type"] == [ONNX_TYPES[vi.type.tensor_type.elem_type]], vi.name
            dims = _graph_dims(vi)
            if batched:
                assert dims[0] == -1, f"{vi.name}: a batched config needs a dynamic first dimension"
                want = dims[1:] if len(dims) > 1 else [1]
                assert t["dims"] == want, (vi.name, t["dims"], dims)
                assert ("reshape" in t) == (len(dims) == 1), vi.name
                if "reshape" in t:
                    assert t["reshape"] == [{"shape": []}], vi.name  # the model sees [B], Triton [B, 1]
            else:
                assert t["dims"] == dims and "reshape" not in t, vi.name
            if section == "input":  # what Triton would hand the model for `batch` stacked requests
                shape = ([batch] if batched else []) + [d if d > 0 else 16 for d in t["dims"]]
                rng = np.random.default_rng(0)
                array = rng.standard_normal(shape).astype(NUMPY[t["data_type"][0]]) if t["data_type"] == [
                    "TYPE_FP32"] else np.full(shape, -1, NUMPY[t["data_type"][0]])
                feeds[vi.name] = array.reshape(batch) if "reshape" in t else array
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    results = sess.run(None, feeds)
    for t, array in zip(config["output"], results):
        expect = [batch] + ([] if "reshape" in t else t["dims"]) if batched else t["dims"]
        assert array.ndim == len(expect) and all(e in (-1, a) for e, a in zip(expect, array.shape)), (
            t["name"], array.shape, expect)
    return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("triton") / "tiny.onnx")


@pytest.mark.parametrize("method, extra", [("gradcam", []), ("gradcam", ["--no-resize"]), ("lrp", [])])
def test_config_matches_the_explain_graph(tiny, tmp_path, method, extra):
    repo = tmp_path / "repo"
    res = CliRunner().invoke(main, ["export-explainer", str(tiny), "-m", method, "--triton", str(repo), *extra],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    config = check_repository(repo / f"tiny_{method}")
    outputs = [t["name"][0] for t in config["output"]]
    assert outputs[-2 if method == "lrp" else -1] == "saliency_map"
    assert [t["name"][0] for t in config["input"]] == ["input", "targets"]
    assert config["max_batch_size"] == [16]


def test_a_graph_with_a_fixed_batch_is_served_unbatched(tiny, tmp_path):
    from onnx_saliency import Explainer
    from onnx_saliency.export import build_explain_graph
    from onnx_saliency.scale import write_triton_repository

    graph = build_explain_graph(Explainer(tiny), "gradcam")
    for vi in list(graph.graph.input) + list(graph.graph.output):
        if vi.type.tensor_type.shape.dim:
            vi.type.tensor_type.shape.dim[0].dim_value = 1  # as an exporter with a static batch writes it
    folder = write_triton_repository(graph, tmp_path, "fixed", kind="gpu")
    config = check_repository(folder, batch=1)
    assert config["max_batch_size"] == [0] and config["instance_group"][0]["kind"] == ["KIND_GPU"]


def test_bad_names_and_options_are_refused_before_writing(tiny, tmp_path):
    res = CliRunner().invoke(main, ["export-explainer", str(tiny), "--triton", str(tmp_path / "r"),
                                    "--triton-name", "no spaces"])
    assert res.exit_code == 2 and "--triton-name 'no spaces'" in res.output and not (tmp_path / "r").exists()
    res = CliRunner().invoke(main, ["export-explainer", str(tiny)])
    assert res.exit_code == 2 and "give -o FILE.onnx, --triton DIR, or both" in res.output
    with pytest.raises(Exception, match="--max-batch-size"):
        triton_config(onnx.ModelProto(), "x", max_batch_size=-1)


def test_the_parser_rejects_broken_text():
    with pytest.raises((ValueError, IndexError)):
        parse_pbtxt('name: "x"\ninput [ { name: "a" dims: [ 1, 2 ] ')
    assert parse_pbtxt('a: 1 b { c: [ 1, 2 ] d: X_Y }') == {"a": [1], "b": [{"c": [1, 2], "d": ["X_Y"]}]}
