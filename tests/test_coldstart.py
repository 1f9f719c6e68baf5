"""Cold start on big models (issue 12): weights held once, rewrites O(nodes), the persistent graph cache, and
the session LRU. Mechanisms, not timings (those are in benchmarks/results_coldstart.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graph_passes as gp
from cli.main import main
from graph_passes._graph import placeholder_ref
from onnx_saliency import Explainer
from onnx_saliency.engine import cache as graph_cache
from onnx_saliency.engine.session import OPTIMIZE_AFTER_IMAGES
from onnx_saliency.errors import SaliencyError
from onnx_saliency.intake.model import load_model

ROOT = Path(__file__).resolve().parents[1]


def big_classifier(path: Path, features: int = 16384, hidden: int = 3072) -> Path:
    """Conv+BN+ReLU+pool, then a Gemm of features x hidden float32 weights (16384 x 3072: 192 MiB)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "c.w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "c.b"),
             numpy_helper.from_array(rng.random(16).astype(np.float32) + 0.5, "bn.g"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bn.b"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bn.m"),
             numpy_helper.from_array(rng.random(16).astype(np.float32) + 0.5, "bn.v"),
             numpy_helper.from_array(rng.random((hidden, features), dtype=np.float32) * 0.02 - 0.01, "fc1.w"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "fc1.b"),
             numpy_helper.from_array(rng.standard_normal((10, hidden)).astype(np.float32) * 0.05, "fc2.w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc2.b")]
    nodes = [helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.g", "bn.b", "bn.m", "bn.v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu_fc"),
             helper.make_node("Gemm", ["hr", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=1)]
    side = int(round((features // 16) ** 0.5)) * 2
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, side, side])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def small_classifier(path: Path) -> Path:
    """The same network at 1/64 of the width: weights large enough to be held in the store (>= 16384 values)."""
    return big_classifier(path, features=1024, hidden=64)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    return big_classifier(tmp_path_factory.mktemp("big") / "big.onnx")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_rewrites_allocate_no_second_copy_of_the_weights(big_model):
    if not Path("/proc/self/status").exists() or not _reset_peak():
        pytest.skip("needs Linux /proc to reset and read the peak resident set")
    model = load_model(big_model)
    weights = model.weights.nbytes
    assert weights > 180 << 20
    # every large weight is a placeholder: the graphs themselves are structure only
    assert all(placeholder_ref(t) is not None for t in model.canonical.graph.initializer if t.name == "fc1.w")
    assert model.canonical.ByteSize() < 1 << 20
    from onnx_saliency.engine import Engine

    engine = Engine(model)
    key, build = engine.graph(expose=["r"], wrt=["r"])
    _reset_peak()
    before = _status("VmRSS")
    for _ in range(3):  # Grad-CAM's graph, built and serialised three times
        graph = build(model.canonical)
        data = graph.SerializeToString()
    grown = _status("VmHWM") - before
    assert len(data) < 1 << 20
    assert grown < weights // 4, f"a rewrite grew the resident set by {grown >> 20} MiB ({weights >> 20} MiB weights)"
    # onnxruntime keeps its own copy (and pre-packed ones) of what it is given, either way; building the
    # session from the store's arrays saves at least the serialised copy a graph with inline weights needs
    import onnxruntime as ort
    from graph_passes._graph import materialize

    _reset_peak()
    before = _status("VmRSS")
    engine.session(key, build)
    ours = _status("VmHWM") - before
    engine.drop_sessions()
    _reset_peak()
    before = _status("VmRSS")
    inline = materialize(build(model.canonical)).SerializeToString()
    sess = ort.InferenceSession(inline, providers=["CPUExecutionProvider"])
    theirs = _status("VmHWM") - before
    del sess, inline
    assert ours + weights // 2 < theirs, (ours >> 20, theirs >> 20)


def test_weights_are_held_once_and_maps_match_the_materialized_graph(tmp_path):
    import onnxruntime as ort
    from graph_passes._graph import materialize
    from onnx_saliency.engine.providers import session_options

    path = small_classifier(tmp_path / "m.onnx")
    ex = Explainer(path, cache=False, optimize=True)
    store = ex.model.weights
    own = store.nbytes
    # the original and the canonical graph share every weight canonicalize did not change
    assert {placeholder_ref(t)[1] for t in ex.model.original.graph.initializer if placeholder_ref(t)} \
        & {placeholder_ref(t)[1] for t in ex.model.canonical.graph.initializer if placeholder_ref(t)}
    x = np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)
    key, build = ex.engine.graph(wrt=["x"])
    graph = build(ex.model.canonical)
    # the same session options (pre-packing changes the GEMM kernel, so the last bits of a sum)
    full = ort.InferenceSession(materialize(graph).SerializeToString(), session_options(),
                                providers=["CPUExecutionProvider"])
    sess, names, _ = ex.engine.session(key, build)
    feeds = {"x": x, gp.TARGETS_INPUT: np.full(2, -1, np.int64)}
    for a, b in zip(full.run(names, feeds), sess.run(names, feeds)):
        np.testing.assert_array_equal(a, b)
    # LRP's modified weights (z+: W+ of the conv and dense layers, their transposes) are nodes on the stored
    # weights that onnxruntime folds into memory of its own (it copies what it is handed anyway): the store
    # never holds them, however many graphs use them
    ex.explain(x, method="lrp", composite="zplus")
    ex.explain(x, method="lrp", composite="zplus", init="one")  # another graph, the same modified weights
    assert len(ex.engine._sessions) >= 3
    assert store.nbytes == own


def _maps(ex, x, methods):
    return {m: ex.explain(x, method=m).maps for m in methods}


def test_cache_hit_on_second_run_rebuilt_when_corrupt_and_maps_identical(tmp_path):

    path = small_classifier(tmp_path / "m.onnx")
    folder = tmp_path / "cache"
    x = np.random.default_rng(2).random((2, 3, 16, 16), dtype=np.float32)
    methods = ("gradcam", "lrp", "guided-backprop")
    reference = _maps(Explainer(path, cache=False, optimize=True), x, methods)

    first = Explainer(path, cache=folder, optimize=True)
    cold = _maps(first, x, methods)
    assert first.engine.graph_source.hits == 0
    files = sorted(folder.glob("*" + graph_cache.SUFFIX))
    saved = sorted(folder.glob("*" + graph_cache.OPTIMIZED_SUFFIX))
    assert len(files) == len(saved) == len(methods)  # each rewritten graph, and onnxruntime's optimisation of it
    assert len(list(folder.glob("*" + graph_cache.WEIGHTS_SUFFIX))) == len(methods)

    def counted(ex):  # the keys of the graphs the engine rewrites (every method's sessions come through here)
        built = []
        real = ex.engine.session

        def counting(key, build):
            return real(key, lambda c: built.append(key) or build(c))

        ex.engine.session = counting
        return built

    second = Explainer(path, cache=folder, optimize=True)
    built = counted(second)
    warm = _maps(second, x, methods)
    assert second.engine.graph_source.optimized_hits == second.engine.graph_source.hits == len(methods)
    assert built == []  # nothing was rewritten (or optimised): every session came from the cache
    for m in methods:
        np.testing.assert_array_equal(cold[m], reference[m])
        np.testing.assert_array_equal(warm[m], reference[m])

    # corrupted entries (one flipped byte) and a foreign one (another entry's bytes) are rebuilt, never used:
    # onnxruntime's optimised graphs (their sessions then come from the rewritten graphs), then, with no
    # optimised graph left, the rewritten ones
    def corrupt(kind):
        blob = bytearray(kind[0].read_bytes())
        blob[-10] ^= 0xFF
        kind[0].write_bytes(bytes(blob))
        kind[1].write_bytes(kind[2].read_bytes())

    corrupt(saved)
    third = Explainer(path, cache=folder, optimize=True)
    built = counted(third)
    again = _maps(third, x, methods)
    src = third.engine.graph_source
    assert (src.rebuilt, src.optimized_hits, src.hits, built) == (2, 1, 3, [])
    for m in methods:
        np.testing.assert_array_equal(again[m], reference[m])
    assert len(list(folder.glob("*" + graph_cache.OPTIMIZED_SUFFIX))) == len(methods)  # saved again
    for f in folder.glob("*" + graph_cache.OPTIMIZED_SUFFIX):
        f.unlink()
    corrupt(files)
    fourth = Explainer(path, cache=folder, optimize=True)
    built = counted(fourth)
    again = _maps(fourth, x, methods)
    src = fourth.engine.graph_source
    assert (src.rebuilt, src.optimized_hits, src.hits, len(built)) == (2, 0, 1, 2)
    for m in methods:
        np.testing.assert_array_equal(again[m], reference[m])
    assert all(graph_cache._unpack(f.read_bytes(), b"") is None for f in files)  # sanity of the checker itself

    # a weight file written to (same size, one bit changed) is never used: its entry is rebuilt
    Explainer(path, cache=folder, optimize=True).explain(x, method="lrp")
    named = [folder / graph_cache._referenced_weights(f) for f in folder.glob("*" + graph_cache.OPTIMIZED_SUFFIX)]
    weights = max(named, key=lambda f: f.stat().st_size)
    data = bytearray(weights.read_bytes())
    assert data, "LRP's derived weights are in its weight file"
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    fifth = Explainer(path, cache=folder, optimize=True)
    maps = fifth.explain(x, method="lrp").maps
    assert fifth.engine.graph_source.rebuilt == 1 and fifth.engine.graph_source.optimized_hits == 0
    np.testing.assert_array_equal(maps, reference["lrp"])


def test_cache_is_keyed_by_model_and_bounded(tmp_path):
    from onnx_saliency.engine import optimized

    a = small_classifier(tmp_path / "a.onnx")
    b = big_classifier(tmp_path / "b.onnx", features=1024, hidden=65)
    folder = tmp_path / "cache"
    x = np.random.default_rng(3).random((1, 3, 16, 16), dtype=np.float32)

    def files():
        return {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file()}

    Explainer(a, cache=folder, optimize=True).explain(x, method="gradcam")
    of_a = files()
    ex_b = Explainer(b, cache=folder, optimize=True)
    ex_b.explain(x, method="gradcam")
    before = files()
    assert ex_b.engine.graph_source.hits == 0 and len(list(folder.glob("*.graph"))) == 2
    assert len(list(folder.glob("*.optimized"))) == 2
    bound = int(sum(before.values()) * 0.6)
    ex_b.use_cache(folder, max_bytes=bound)
    ex_b.explain(x, method="gradient")
    after = files()
    assert sum(after.values()) <= bound  # least recently used evicted to stay within the bound
    assert not set(of_a) & set(after)  # the oldest (model a's) went first
    assert set(after) - set(before)  # what the last run wrote is kept


def test_two_processes_writing_at_once_leave_one_valid_entry(tmp_path):
    path = small_classifier(tmp_path / "m.onnx")
    folder = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import numpy as np, sys
        sys.path.insert(0, {str(ROOT)!r})
        from onnx_saliency import Explainer
        ex = Explainer({str(path)!r}, cache={str(folder)!r})
        src = ex.engine.graph_source
        key, build = ex.engine.graph(expose=["r"], wrt=["r"])
        data = build(ex.model.canonical).SerializeToString()
        for _ in range(30):  # both processes replace the same entry over and over
            src.save(key, data)
        print(len(data))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    sizes = {int(p.communicate(timeout=300)[0].strip()) for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(sizes) == 1
    entries = list(folder.glob("*" + graph_cache.SUFFIX))
    assert len(entries) == 1 and not list(folder.glob(".*.tmp"))
    ex = Explainer(path, cache=folder)
    key, _ = ex.engine.graph(expose=["r"], wrt=["r"])
    assert len(ex.engine.graph_source.load(key)) == sizes.pop()


def test_session_lru_keeps_the_memory_budget(tmp_path):
    path = small_classifier(tmp_path / "m.onnx")
    ex = Explainer(path, cache=False)
    x = np.random.default_rng(4).random((1, 3, 16, 16), dtype=np.float32)
    methods = ("gradcam", "lrp", "guided-backprop", "gradient", "excitation-backprop")
    ref = Explainer(path, cache=False)
    reference = {m: ref.explain(x, method=m).maps for m in methods}
    assert len(ref.engine._sessions) == len(methods)  # the default budget holds them all
    sizes = ref.engine.session_bytes.values()
    ex.engine.memory_budget = sum(sizes) - 1  # room for the largest session, never for all five
    assert ex.engine.memory_budget >= max(sizes) and min(sizes) > 0
    for _ in range(2):
        for m in methods:
            np.testing.assert_array_equal(ex.explain(x, method=m).maps, reference[m])
            assert sum(ex.engine.session_bytes.values()) <= ex.engine.memory_budget
            assert len(ex.engine._sessions) < len(methods)
    assert ex.engine.evictions >= len(methods)
    # derived weights of evicted sessions left the store with them
    live = set().union(*ex.engine._weight_keys.values())
    assert all(not k.startswith("derived/") or k in live for k in ex.model.weights.arrays)


def test_a_graph_runs_unoptimised_for_its_first_images_then_optimised(tmp_path):
    """Two tiers (engine.session): onnxruntime's optimisation costs more than it saves on a few images, so a
    graph's first OPTIMIZE_AFTER_IMAGES images run unoptimised; the tier depends on the images run, never on the
    cache, and both tiers' maps agree to float rounding."""
    path = small_classifier(tmp_path / "m.onnx")
    rng = np.random.default_rng(5)
    x = rng.random((1, 3, 16, 16), dtype=np.float32)
    many = rng.random((OPTIMIZE_AFTER_IMAGES + 1, 3, 16, 16), dtype=np.float32)

    def tier(ex, method):
        (sess, _, _), = [v for k, v in ex.engine._sessions.items() if k[0] == method]
        return "unoptimised" if sess.unoptimized else "optimised"

    optimised = Explainer(path, cache=False, optimize=True)
    for method in ("lrp", "gradcam"):
        key = "lrp" if method == "lrp" else "vjp"
        ex = Explainer(path, cache=tmp_path / method)
        first = ex.explain(x, method=method).maps
        assert tier(ex, key) == "unoptimised"
        assert not list((tmp_path / method).glob("*" + graph_cache.OPTIMIZED_SUFFIX))  # nothing optimised, saved
        reference = optimised.explain(x, method=method).maps
        np.testing.assert_allclose(first, reference, rtol=1e-4, atol=1e-6 * np.abs(reference).max())
        np.testing.assert_array_equal(first, Explainer(path, cache=False).explain(x, method=method).maps)
        for _ in range(OPTIMIZE_AFTER_IMAGES - 1):
            again = ex.explain(x, method=method).maps
        assert tier(ex, key) == "unoptimised"
        np.testing.assert_array_equal(again, first)  # same tier, same bits
        np.testing.assert_array_equal(ex.explain(x, method=method).maps, reference)  # the ninth: optimised
        assert tier(ex, key) == "optimised"
    # one call with more images than the first tier takes: optimised before it runs
    ex = Explainer(path, cache=False)
    np.testing.assert_array_equal(ex.explain(many, method="gradcam").maps,
                                  optimised.explain(many, method="gradcam").maps)
    assert tier(ex, "vjp") == "optimised"
    # a caller that says how many images it will run gets the optimised sessions at once
    ex = Explainer(path, cache=False)
    ex.engine.expect_images(OPTIMIZE_AFTER_IMAGES)
    ex.explain(x, method="gradcam")
    assert tier(ex, "vjp") == "optimised"
    ex = Explainer(path, cache=False, optimize=False)
    ex.explain(many, method="gradcam")
    assert tier(ex, "vjp") == "unoptimised"
    with pytest.raises(SaliencyError, match="optimize='yes'"):
        Explainer(path, cache=False, optimize="yes")


def test_cache_cli_info_and_clear(tmp_path):
    path = small_classifier(tmp_path / "m.onnx")
    folder = tmp_path / "cache"
    images = tmp_path / "imgs"
    images.mkdir()
    import cv2

    cv2.imwrite(str(images / "a.png"), np.full((20, 20, 3), 90, np.uint8))
    runner = CliRunner()

    def explain(out, *cache):
        res = runner.invoke(main, ["explain", str(path), str(images), "--out", str(tmp_path / out), "-m", "gradcam",
                                   *cache, "--preset", "torchvision", "-q"])
        assert res.exit_code == 0, res.output

    explain("o1", "--cache-dir", str(folder))  # one image: the rewritten graph, run unoptimised
    res = runner.invoke(main, ["cache", "info", "--cache-dir", str(folder)])
    assert res.exit_code == 0 and "entries      1\n" in res.output
    assert "optimized    0 onnxruntime-optimised graph(s), 0 weight file(s)" in res.output
    explain("o2", "--no-cache")
    assert np.array_equal(np.load(tmp_path / "o1/a/gradcam.npy"), np.load(tmp_path / "o2/a/gradcam.npy"))
    for k in range(1, OPTIMIZE_AFTER_IMAGES):  # enough images for onnxruntime's optimisation to pay
        cv2.imwrite(str(images / f"b{k}.png"), np.full((20, 20, 3), 90 + k, np.uint8))
    explain("o3", "--cache-dir", str(folder))
    res = runner.invoke(main, ["cache", "info", "--cache-dir", str(folder)])
    assert "optimized    1 onnxruntime-optimised graph(s), 1 weight file(s)" in res.output
    explain("o4", "--no-cache")
    for k in range(1, OPTIMIZE_AFTER_IMAGES):
        assert np.array_equal(np.load(tmp_path / f"o3/b{k}/gradcam.npy"), np.load(tmp_path / f"o4/b{k}/gradcam.npy"))
    res = runner.invoke(main, ["cache", "clear", "--cache-dir", str(folder)])
    assert res.exit_code == 0 and "removed 2" in res.output
    assert not [f for f in folder.iterdir() if f.is_file()]


def test_suite_never_uses_the_user_cache():
    import os

    assert os.environ.get(graph_cache.ENV) == "off" and graph_cache.default_cache_dir() is None


def test_structure_is_read_without_the_large_weights_which_stay_in_the_file(tmp_path):
    from onnx_saliency.intake.wire import read_structure

    path = small_classifier(tmp_path / "m.onnx")
    full = onnx.load(str(path))
    model, found = read_structure(path, 1 << 14)
    raw = path.read_bytes()
    names = [t.name for t in full.graph.initializer]
    assert [names[i] for i in found] == ["fc1.w"]
    for i, (t, s) in enumerate(zip(full.graph.initializer, model.graph.initializer)):
        if i in found:
            offset, length = found[i]
            assert raw[offset:offset + length] == t.raw_data and not s.raw_data and s.name == t.name
        else:
            assert s == t
    assert list(model.graph.node) == list(full.graph.node) and model.opset_import == full.opset_import
    # the loaded model maps that weight from the file, read-only, and never holds it in its graphs
    loaded = load_model(path)
    assert set(loaded.weights.files) == {"fc1.w"}
    assert isinstance(loaded.weights.arrays["fc1.w"], np.memmap) and not loaded.weights.arrays["fc1.w"].flags.writeable


def test_a_model_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """The sha256 (and NaN check) of a model file is remembered by the file's identity in the cache folder: a
    second load reads none of its weights; a rewrite (same bytes or not, same size) is read and hashed again."""
    import hashlib

    from onnx_saliency.errors import SaliencyError
    from onnx_saliency.intake import model as model_module

    path = small_classifier(tmp_path / "m.onnx")
    folder = tmp_path / "cache"
    scans = []
    real = model_module._scan_file
    monkeypatch.setattr(model_module, "_scan_file", lambda *a: (scans.append(a[0]), real(*a))[1])

    def sha():
        return Explainer(path, cache=folder).model.sha256

    sha()
    assert sha() and len(scans) == 2  # written just now: not remembered (coarse file system timestamps)
    monkeypatch.setattr(graph_cache, "RACY_SECONDS", 0)
    scans.clear()
    assert sha() == hashlib.sha256(path.read_bytes()).hexdigest() and len(scans) == 1
    assert sha() == hashlib.sha256(path.read_bytes()).hexdigest() and len(scans) == 1  # remembered
    assert len(Explainer(path, cache=False).model.sha256) == 64 and len(scans) == 2  # no cache: always read
    path.write_bytes(path.read_bytes())  # the same bytes, written again: read again
    assert sha() == hashlib.sha256(path.read_bytes()).hexdigest() and len(scans) == 3
    m = onnx.load(str(path))
    fc = next(t for t in m.graph.initializer if t.name == "fc1.w")
    values = numpy_helper.to_array(fc).copy()
    values[3, 5] = 0.5
    fc.CopyFrom(numpy_helper.from_array(values, "fc1.w"))
    size = path.stat().st_size
    onnx.save(m, str(path))
    assert path.stat().st_size == size  # other content, same size
    assert sha() == hashlib.sha256(path.read_bytes()).hexdigest() and len(scans) == 4
    values[7, 1] = np.nan
    fc.CopyFrom(numpy_helper.from_array(values, "fc1.w"))
    onnx.save(m, str(path))
    with pytest.raises(SaliencyError, match="weight 'fc1.w' contains NaN"):
        sha()
    with pytest.raises(SaliencyError, match="weight 'fc1.w' contains NaN"):  # a failed check is not remembered
        sha()
    assert graph_cache.clear(folder) == 0 and not any((folder / graph_cache.DIGESTS).iterdir())


def test_the_command_line_hashes_the_model_before_importing_onnx(tmp_path, monkeypatch):
    """explain begins the model's sha256 with only the standard library loaded (onnx_saliency.prehash); the scan
    then takes that digest and reads the weights for the NaN check alone; a file changed after hashing began
    is hashed again by the scan, and its NaN is still found."""
    import hashlib

    from onnx_saliency import prehash
    from onnx_saliency.intake import model as model_module

    path = small_classifier(tmp_path / "m.onnx")
    images = tmp_path / "imgs"
    images.mkdir()
    import cv2

    cv2.imwrite(str(images / "a.png"), np.full((20, 20, 3), 90, np.uint8))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from onnx_saliency import prehash
        heavy = ("onnx", "onnxruntime", "numpy", "cv2", "graph_passes")
        real = prehash.start
        def start(*a, **k):
            print("loaded at start:", sorted(m for m in heavy if m in sys.modules))
            return real(*a, **k)
        prehash.start = start
        from cli.main import main
        sys.argv = ["onnx-saliency", "explain", {str(path)!r}, {str(images)!r}, "--out", {str(tmp_path / "o")!r},
                    "--no-cache", "-q", "--preset", "torchvision"]
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "loaded at start: []" in done.stdout
    runner = CliRunner()  # a command that ends before reading its model leaves nothing started behind
    res = runner.invoke(main, ["explain", str(path), str(images), "--out", str(tmp_path / "o2"), "-m", "nosuch"])
    assert res.exit_code == 2 and str(path) not in prehash._STARTED

    digests = []
    real = model_module._scan_file
    monkeypatch.setattr(model_module, "_scan_file", lambda p, r, d: (digests.append(d), real(p, r, d))[1])
    truth = hashlib.sha256(path.read_bytes()).hexdigest()
    prehash.start(path)
    assert Explainer(path, cache=False).model.sha256 == truth and digests == [None]  # the scan did not hash
    prehash.start(path)
    prehash._STARTED[str(path)].thread.join()
    m = onnx.load(str(path))
    fc = next(t for t in m.graph.initializer if t.name == "fc1.w")
    values = numpy_helper.to_array(fc).copy()
    values[2, 2] = np.nan
    fc.CopyFrom(numpy_helper.from_array(values, "fc1.w"))
    onnx.save(m, str(path))  # after hashing began: that digest is another file's
    with pytest.raises(SaliencyError, match="weight 'fc1.w' contains NaN"):
        Explainer(path, cache=False)
    assert digests[-1] is not None and str(path) not in prehash._STARTED
