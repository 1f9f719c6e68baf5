"""benchmarks/coverage.py's bookkeeping: one-line errors that read alike across models, jobs folded into cache
entries (a timed-out job keeps what it finished), the cache merged across runs and the report built from it."""

import json

from benchmarks import coverage as cov
from onnx_saliency.errors import UnsupportedModelError


def test_unsupported_node_lists_become_op_types_without_the_temporary_path(tmp_path):
    path = tmp_path / "model.onnx"
    err = UnsupportedModelError(f"{path}: unsupported op(s) in 3 node(s): /s2/Gather (Gather), node_Split_8 "
                                "(Split), /s3/Gather (Gather)\nsecond line")
    line = cov._line(err, path)
    assert line == "UnsupportedModelError: unsupported op(s): Gather, Split (3 nodes)"
    assert cov.unsupported_ops(line) == ["Gather", "Split"]
    assert cov._line(ValueError("bad\nmore")) == "ValueError: bad"
    grouped = UnsupportedModelError(f"{path}: unsupported op(s) in 276 node(s): Slice (274: a, b, c and 271 more); "
                                    "Gather (2: d, e)")
    assert cov._line(grouped, path) == "UnsupportedModelError: unsupported op(s): Gather, Slice (276 nodes)"
    lrp = UnsupportedModelError("LRP composite epsilon: no relevance rule for 2 node(s): Softmax (1: s); Mul (1: p)")
    line = cov._line(lrp)
    assert line == "UnsupportedModelError: LRP composite epsilon: no relevance rule for op(s): Mul, Softmax (2 nodes)"
    assert cov.unsupported_ops(line) == ["Mul", "Softmax"]


def test_a_job_that_stopped_early_marks_the_methods_it_never_reached():
    lines = [{"step": "build", "params": 5, "size": 32}, {"step": "export", "opset": 17, "ops": ["Conv"]},
             {"step": "load", "error": "UnsupportedModelError: unsupported op(s): Split (1 nodes)"}]
    entry = cov.collect(lines, ["gradient", "lrp"])
    assert entry["methods"]["lrp"] == {"error": "load: UnsupportedModelError: unsupported op(s): Split (1 nodes)",
                                       "not_run": True}
    assert cov.failed(entry)
    ok = cov.collect([{"step": "method", "method": "gradient", "seconds": 1.0},
                      {"step": "parity", "max_rel_error": 1e-6, "rel_l2": 1e-7}], ["gradient"])
    assert not cov.failed(ok)


def test_report_counts_methods_and_names_the_blocking_ops(tmp_path):
    def entry(model, exporter, methods, parity):
        return {"model": model, "exporter": exporter, "methods": methods, "parity": parity, "wall_s": 1.0,
                "when": "2026-01-01T00:00:00", "commit": "abc", "load": "1.0",
                "steps": {"build": {"params": 2e6}, "export": {"opset": 17}}}

    blocked = {"error": "load: UnsupportedModelError: unsupported op(s): LayerNormalization (2 nodes)"}
    cache = {"jobs": {
        "torchvision/a|legacy": entry("torchvision/a", "legacy", {"gradient": {}, "lrp": {}},
                                      {"max_rel_error": 2e-6, "rel_l2": 1e-6}),
        "torchvision/b|legacy": entry("torchvision/b", "legacy", {"gradient": blocked, "lrp": blocked}, None)}}
    out = tmp_path / "coverage.md"
    cov.write_report(cache, out)
    text = out.read_text()
    assert "| torchvision | legacy | 2 | 1/2 | 1/2 | 1/2 |" in text
    assert "| torchvision/a | legacy | 17 | 2.0 | 2.0e-06 | 1.0e-06 | - | ok | ok |" in text
    assert "| torchvision/b | legacy | 17 | 2.0 | - | - | - | E1 | E1 |" in text
    assert "| LayerNormalization | 1 | torchvision/b |" in text
    cov.save_cache(cache, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == cache


def test_parity_counts_float32_limited_models_as_right():
    assert cov.parity_ok({"max_rel_error": 5e-3})
    assert not cov.parity_ok({"max_rel_error": 0.3}) and not cov.parity_ok(None)
    # GoogLeNet-like: 1e-15 gradients; torch float32 is itself 0.8 from float64, ours 0.74
    assert cov.parity_ok({"max_rel_error": 0.8, "float32_floor": 0.8, "max_rel_error_f64": 0.74})
    assert not cov.parity_ok({"max_rel_error": 0.8, "float32_floor": 1e-6, "max_rel_error_f64": 0.8})
