"""Hostile inputs, by class (issue 18), each with generated variants: whatever a user or an attacker passes,
every command ends in one `error:` line and a non-zero exit, or in a right answer; never a traceback, a file
written outside --out, a clobbered file or a silent wrong answer.

Hypothesis budgets are small and derandomised (the same examples on every run) so the file holds on a
loaded 2-core machine."""

import atexit
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from onnx_saliency.cli.main import main
from onnx_saliency.errors import SaliencyError
from onnx_saliency.methods import METHODS, get_method
from onnx_saliency.methods.options import Option, check_options
from tests.graphs import tiny_classifier

FEW = settings(max_examples=40, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_WORK = Path(tempfile.mkdtemp(prefix="hostile-"))  # hypothesis examples share no pytest tmp_path
atexit.register(shutil.rmtree, _WORK, True)
MODEL = tiny_classifier(_WORK / "tiny.onnx")
IMAGES = _WORK / "imgs"
IMAGES.mkdir()
for _i in range(2):
    cv2.imwrite(str(IMAGES / f"img{_i}.png"), np.random.default_rng(_i).integers(0, 255, (16, 16, 3), np.uint8))


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.exception


def _one_error_line(code, text, exc, *needles):
    """Exit 2, no traceback, exactly one `error:` line, naming every needle."""
    assert exc is None or isinstance(exc, SystemExit), f"escaped: {exc!r}\n{text}"
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --- class 5: options are declared once and validated everywhere ---------------------------------------

ALL_METHODS = [get_method(name) for name in sorted(METHODS)] + [get_method("gradcam+ge"), get_method("lrp+ge")]
DECLARED = [(m, opt) for m in ALL_METHODS for opt in m.declared_options({}).values()]


def test_every_option_a_method_reads_is_declared():
    """Each `req.option("name")` / `req.options.get("name")` / `req.options["name"]` in the method modules
    names an option its module declares (an undeclared one would be refused as unknown by the CLI)."""
    import re

    import onnx_saliency.methods as pkg

    declared = {opt.name for _, opt in DECLARED}
    used = set()
    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        used |= set(re.findall(r"""req\.option\(\s*["'](\w+)["']""", text))
        used |= set(re.findall(r"""req\.options(?:\.get\(|\[)\s*["'](\w+)["']""", text))
    assert used and used <= declared, sorted(used - declared)


@pytest.mark.parametrize("method,opt", DECLARED, ids=[f"{m.name}-{o.name}" for m, o in DECLARED])
def test_declarations_are_well_formed(method, opt):
    assert isinstance(opt, Option) and opt.help and opt.name.isidentifier()
    if opt.default is not None and opt.kind != "array":
        assert opt.parse(opt.default, method.name) == opt.default  # the default passes its own check
    if opt.kind == "choice":
        assert opt.default in opt.choices


_values = st.one_of(st.text(max_size=12), st.integers(-10 ** 7, 10 ** 7), st.floats(allow_nan=True),
                    st.booleans(), st.sampled_from(["0", "1", "1e3", "-0", " 5 ", "nan", "inf", "²", "٣", "true"]))


@FEW
@given(pick=st.integers(0, len(DECLARED) - 1), value=_values)
def test_any_value_is_parsed_to_the_declaration_or_refused_in_one_line(pick, value):
    method, opt = DECLARED[pick]
    try:
        check_options([method], {opt.name: value})
    except SaliencyError as err:
        text = str(err)
        assert text.startswith(f"--option {opt.name}=") and method.name in text and "\n" not in text
        return
    parsed = opt.parse(value, method.name)
    if opt.kind in ("int", "float"):
        assert np.isfinite(parsed)
        assert opt.low is None or parsed >= opt.low
        assert opt.high is None or parsed <= opt.high
        assert opt.kind == "float" or isinstance(parsed, int)
    elif opt.kind == "choice":
        assert parsed in opt.choices
    elif opt.kind == "bool":
        assert isinstance(parsed, bool)


def _typo(draw, name):
    i = draw(st.integers(0, len(name) - 1))
    kind = draw(st.sampled_from(["drop", "swap", "double", "case"]))
    if kind == "drop":
        return name[:i] + name[i + 1:]
    if kind == "swap" and i + 1 < len(name):
        return name[:i] + name[i + 1] + name[i] + name[i + 2:]
    if kind == "case":
        return name.upper()
    return name[:i] + name[i] + name[i:]


@st.composite
def typos(draw):
    method, opt = draw(st.sampled_from([(m, o) for m, o in DECLARED if len(o.name) >= 4]))
    return method, opt, _typo(draw, opt.name)


@FEW
@given(case=typos())
def test_a_misspelt_option_is_refused_naming_it_and_the_closest(case):
    method, opt, typo = case
    known = method.declared_options({})
    if typo in known:
        return
    with pytest.raises(SaliencyError) as err:
        check_options([method], {typo: "1"})
    text = str(err.value)
    assert text.startswith(f"--option {typo}: not an option of {method.name}") and "\n" not in text
    assert "did you mean" in text  # one edit away from a declared name: always a suggestion


@FEW
@given(key=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=10))
def test_unknown_keys_never_pass_silently(key):
    m = get_method("integrated-gradients")
    if key in m.declared_options({}):
        return
    with pytest.raises(SaliencyError, match="not an option of integrated-gradients"):
        check_options([m], {key: 3})


def test_a_key_one_method_of_the_run_declares_is_accepted_for_the_run():
    check_options([get_method("gradcam"), get_method("integrated-gradients")], {"steps": 4})
    with pytest.raises(SaliencyError, match="variant.*scorecam"):  # each declaring method checks the value
        check_options([get_method("scorecam"), get_method("guidance-cam")], {"variant": "per-channel"})


@pytest.mark.parametrize("pair,needle", [
    ("stpes=5", "did you mean 'steps'"), ("steps=0", "from 1 to 10000"), ("steps=-3", "from 1 to 10000"),
    ("steps=abc", "integer"), ("steps=2.5", "integer"), ("steps=99999999", "from 1 to 10000"),
    ("baseline=garbage", "finite number"), ("baseline=nan", "finite number"), ("=3", "KEY=VALUE"),
    ("steps", "KEY=VALUE")])
def test_explain_refuses_bad_options_before_any_work(tmp_path, pair, needle):
    out = tmp_path / "out"
    code, text, exc = _cli("explain", MODEL, IMAGES, "-m", "integrated-gradients", "--option", pair, "--out", out)
    _one_error_line(code, text, exc, "--option", needle)
    assert not out.exists()


def test_options_are_refused_alike_by_evaluate_audit_and_compare(tmp_path):
    for args in (["evaluate", MODEL, IMAGES, "-m", "smoothgrad", "--option", "noise_levle=0.2"],
                 ["audit", MODEL, MODEL, IMAGES, "-m", "smoothgrad", "--option", "noise_levle=0.2"],
                 ["compare", MODEL, IMAGES / "img0.png", "-m", "smoothgrad", "--option", "noise_levle=0.2"]):
        _one_error_line(*_cli(*args, "--out", tmp_path / args[0]), "noise_levle", "noise_level")
        assert not (tmp_path / args[0]).exists()


def test_composite_flag_with_no_lrp_method_is_refused(tmp_path):
    _one_error_line(*_cli("explain", MODEL, IMAGES, "-m", "gradcam", "--composite", "epsilon-plus",
                          "--out", tmp_path / "o"), "--composite", "gradcam")


def test_api_refuses_what_the_cli_refuses():
    from onnx_saliency import Explainer

    ex = Explainer(MODEL)
    x = np.random.default_rng(0).integers(0, 255, (1, 16, 16, 3), np.uint8)
    for bad, needle in (({"steps": 0}, "steps=0"), ({"stpes": 4}, "did you mean 'steps'"),
                        ({"baseline": np.full((1, 3, 16, 16), np.nan, np.float32)}, "baseline"),
                        ({"steps": "-3"}, "steps")):
        with pytest.raises(SaliencyError, match=needle):
            ex.explain(list(x), method="integrated-gradients", **bad)
    with pytest.raises(SaliencyError, match="broadcast"):
        ex.explain(list(x), method="integrated-gradients", baseline=np.zeros((5, 7), np.float32))
    r = ex.explain(list(x), method="integrated-gradients", steps="3")  # text parses to the declared int
    assert np.isfinite(r.maps).all() and r.options["steps"] == 3


def test_sidecar_records_the_declared_options_as_used(tmp_path):
    import json

    out = tmp_path / "out"
    code, text, exc = _cli("explain", MODEL, IMAGES, "-m", "smoothgrad", "-m", "gradcam", "--option", "n=2",
                           "--out", out, "-q")
    assert code == 0 and exc is None, text
    meta = json.loads((out / "img0" / "smoothgrad.json").read_text())
    assert meta["options"] == {"n": 2, "noise_level": 0.1, "seed": 0, "noise": None}
    assert json.loads((out / "img0" / "gradcam.json").read_text())["options"] == {}


def test_methods_lists_every_declared_option():
    code, text, exc = _cli("methods")
    assert code == 0, text
    flat = " ".join(text.split())
    for method, opt in DECLARED:
        assert opt.describe() in flat, opt.describe()


@FEW
@given(target=st.one_of(st.text(st.characters(categories=("Nd", "No", "Nl")), min_size=1, max_size=3),
                        st.text(min_size=1, max_size=6)))
def test_any_target_text_is_a_class_or_one_line_error(target):
    from onnx_saliency import Explainer

    ex = _explainer()
    try:
        got = ex.targets(target, 1)
    except SaliencyError as err:
        assert str(err).startswith("--target") and "\n" not in str(err)
        return
    assert got.dtype == np.int64 and (got[0] == -1 or 0 <= got[0] < ex.model.num_classes)
    assert isinstance(ex, Explainer)


_EX = []


def _explainer():
    from onnx_saliency import Explainer

    if not _EX:
        _EX.append(Explainer(MODEL))
    return _EX[0]


def test_superscript_target_is_an_error_line(tmp_path):
    _one_error_line(*_cli("explain", MODEL, IMAGES, "--target", "²", "--out", tmp_path / "o"), "--target")


@pytest.mark.parametrize("threads", ["0", "-1", "100000", "abc"])
def test_threads_are_bounded(tmp_path, threads):
    code, text, exc = _cli("explain", MODEL, IMAGES, "--threads", threads, "--out", tmp_path / "o")
    assert code == 2 and exc is None or isinstance(exc, SystemExit), text
    assert "--threads" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size,cols", [("100000", None), ("4097", None), ("7", None), ("64", "1000")])
def test_compare_canvas_is_bounded(tmp_path, size, cols):
    extra = ["--cols", cols] if cols else []
    _one_error_line(*_cli("compare", MODEL, IMAGES / "img0.png", "--size", size, *extra,
                          "--out", tmp_path / "c.png"), "--size" if not cols else "--cols")
    assert not (tmp_path / "c.png").exists()


# --- class 1: untrusted names become paths -----------------------------------------------------------------

_stems = st.binary(min_size=1, max_size=60).filter(lambda b: b"/" not in b and b"\0" not in b)


@FEW
@given(raw=_stems)
def test_output_names_stay_inside_out_and_are_plain_or_escaped(raw):
    import os

    from onnx_saliency.output.sidecar import output_name

    image = Path(os.fsdecode(raw + b".png"))
    name = output_name(image)
    assert name and name not in (".", "..") and "/" not in name and "\0" not in name
    assert not name.startswith(".") and len(name.encode("utf-8")) <= 255 and name.isprintable()
    out = _WORK / "names-out"
    assert (out / name).resolve().parent == out.resolve()  # one level below --out, whatever the name
    stem = os.fsdecode(raw)
    # plain names are the stem itself; others hold a '%', which plain names never do
    assert name == stem or "%" in name
    if "%" in stem or stem.startswith(".") or not stem.isprintable():
        assert name != stem


@FEW
@given(a=_stems, b=_stems)
def test_different_stems_never_share_an_output_folder(a, b):
    import os

    from onnx_saliency.output.sidecar import output_name

    if a != b:
        assert output_name(os.fsdecode(a + b".png")) != output_name(os.fsdecode(b + b".png"))


HOSTILE_NAMES = [b"...png", b"..png", b".hidden.png", b"50%.png", b"bad\xff\xfe.png", b"new\nline.png",
                 b"tab\tand space.png", b"caf\xc3\xa9.png", b"\xe2\x80\xae-rtl.png", b"x" * 200 + b".png"]


def test_hostile_image_names_explain_inside_out_with_reversible_sidecars(tmp_path):
    import json
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    data = (IMAGES / "img0.png").read_bytes()
    for raw in HOSTILE_NAMES:
        with open(os.path.join(os.fsencode(folder), raw), "wb") as f:
            f.write(data)
    out = tmp_path / "deep" / "out"
    code, text, exc = _cli("explain", MODEL, folder, "--out", out, "-q")
    assert code == 0 and exc is None, text
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and folder not in p.parents)
    assert written and all(out in p.parents for p in written)  # nothing outside --out
    recorded = set()
    for sidecar in out.glob("*/gradcam.json"):
        meta = json.loads(sidecar.read_bytes())
        assert meta["output_name"] == sidecar.parent.name
        recorded.add(os.fsencode(Path(meta["image"]).name))  # the exact bytes of the file name, back
        assert (sidecar.parent / "gradcam.npy").is_file() and (sidecar.parent / "gradcam.png").is_file()
    assert recorded == set(HOSTILE_NAMES)
    code, text, exc = _cli("explain", MODEL, folder, "--out", out, "--resume")  # and resume finds them all
    assert code == 0 and "already complete" in text, text


# --- class 2: writers refuse what they must not replace ----------------------------------------------------

def test_export_never_writes_over_its_model_by_any_spelling(tmp_path):
    import os

    model = tmp_path / "m.onnx"
    model.write_bytes(MODEL.read_bytes())
    before = model.read_bytes()
    (tmp_path / "link.onnx").symlink_to(model)
    os.link(model, tmp_path / "hard.onnx")
    for target in (model, tmp_path / "." / "m.onnx", tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        _one_error_line(*_cli("export-explainer", model, "-o", target), "input of this run")
    assert model.read_bytes() == before and (tmp_path / "link.onnx").is_symlink()


def test_compare_never_writes_over_its_image(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes((IMAGES / "img0.png").read_bytes())
    _one_error_line(*_cli("compare", MODEL, image, "-o", image), "input of this run")
    assert image.read_bytes() == (IMAGES / "img0.png").read_bytes()


@pytest.mark.parametrize("kind", ["fifo", "dir", "devnull"])
def test_writers_refuse_non_regular_targets(tmp_path, kind):
    import os
    import stat

    from onnx_saliency.output.writers import write_bytes, write_json

    target = tmp_path / "t.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    else:
        target.symlink_to("/dev/null")
    for write in (lambda: write_bytes(target, b"x"), lambda: write_json(target, {"a": 1})):
        with pytest.raises(SaliencyError, match="refusing to replace it"):
            write()
    mode = os.stat(target).st_mode
    assert {"fifo": stat.S_ISFIFO, "dir": stat.S_ISDIR, "devnull": stat.S_ISCHR}[kind](mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_explain_into_a_fifo_target_is_an_error_not_a_hang(tmp_path):
    import os

    out = tmp_path / "out"
    (out / "img0").mkdir(parents=True)
    os.mkfifo(out / "img0" / "gradcam.json")
    _one_error_line(*_cli("explain", MODEL, IMAGES / "img0.png", "--out", out), "FIFO")


# --- class 7: concurrent runs into one --out ----------------------------------------------------------------

def test_cleanup_spares_a_live_writers_temp_and_removes_a_dead_ones(tmp_path):
    import subprocess
    import sys

    from onnx_saliency.output.writers import stale_temps, temp_prefix

    target = tmp_path / "gradcam.json"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        live_tmp = tmp_path / (temp_prefix(target, live.pid) + "abc.tmp")
        dead_tmp = tmp_path / (temp_prefix(target, int(dead.stdout)) + "abc.tmp")
        legacy_tmp = tmp_path / f".{target.name}xyz.tmp"  # an older version's name, no pid
        for p in (live_tmp, dead_tmp, legacy_tmp):
            p.write_bytes(b"partial")
        assert sorted(stale_temps(target)) == sorted([dead_tmp, legacy_tmp])
    finally:
        live.kill()
        live.wait()


def test_two_explain_runs_into_one_out_both_finish(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "onnx_saliency.cli.main", "explain", str(MODEL), str(IMAGES), "-m", "gradcam",
           "-m", "gradient", "--out", str(out), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    for run in runs:
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr
        assert "Traceback" not in stderr
    for image in ("img0", "img1"):
        for method in ("gradcam", "gradient"):
            assert json.loads((out / image / f"{method}.json").read_text())["method"] == method
    assert not list(out.rglob("*.tmp"))


# --- class 8: model-hub style snapshots --------------------------------------------------------------------

def test_hub_snapshot_symlinks_load_and_links_out_are_refused(tmp_path):
    import onnx

    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    snap = hub / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    model = onnx.load(str(MODEL))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="model.onnx_data",
              size_threshold=0)
    (tmp_path / "ext.onnx").rename(hub / "blobs" / "aaa")
    (tmp_path / "model.onnx_data").rename(hub / "blobs" / "bbb")
    (snap / "model.onnx").symlink_to("../../blobs/aaa")
    (snap / "model.onnx_data").symlink_to("../../blobs/bbb")
    code, text, exc = _cli("explain", snap / "model.onnx", IMAGES, "--out", tmp_path / "o", "-q")
    assert code == 0 and exc is None, text
    plain = np.load(_explain_plain(tmp_path))
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "img0" / "gradcam.npy"), plain)
    # a data link leading anywhere else is still refused
    secret = tmp_path / "secret.bin"
    secret.write_bytes((hub / "blobs" / "bbb").read_bytes())
    (snap / "model.onnx_data").unlink()
    (snap / "model.onnx_data").symlink_to(secret)
    _one_error_line(*_cli("info", snap / "model.onnx"), "outside the model folder")


def _explain_plain(tmp_path):
    out = tmp_path / "plain"
    code, text, exc = _cli("explain", MODEL, IMAGES, "--out", out, "-q")
    assert code == 0, text
    return out / "img0" / "gradcam.npy"


# --- class 3: errors never escape as tracebacks; crashes have their own exit code --------------------------

def _variant(tmp_path, name, change):
    import onnx

    model = onnx.load(str(MODEL))
    change(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _opset(version):
    def change(model):
        model.opset_import[0].version = version
    return change


def _fc_shape(shape):
    def change(model):
        from onnx import numpy_helper

        for t in model.graph.initializer:
            if t.name == "fc":
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(shape), "fc"))
    return change


@pytest.mark.parametrize("name,change,needle", [
    ("opset.onnx", _opset(99), "onnxruntime cannot load the model"),
    ("fc16x2.onnx", _fc_shape((2, 16)), "onnxruntime cannot load the model"),
    ("fc8x4.onnx", _fc_shape((8, 4)), "cannot load the model")])
def test_session_failures_are_one_line_before_any_image(tmp_path, capfd, name, change, needle):
    import subprocess
    import sys

    path = _variant(tmp_path, name, change)
    for command in (["info", path], ["explain", path, IMAGES, "--out", tmp_path / "o"]):
        run = subprocess.run([sys.executable, "-m", "onnx_saliency.cli.main", *map(str, command)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {name}: ") and needle in lines[0], run.stderr
        assert "\x1b[" not in run.stderr and "[ONNXRuntimeError]" not in run.stderr  # no runtime log lines
    assert not (tmp_path / "o").exists()


def test_an_unexpected_error_exits_3_in_one_line(tmp_path, monkeypatch):
    from onnx_saliency.explainer import Explainer

    def boom(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(Explainer, "targets", boom)
    code, text, exc = _cli("explain", MODEL, IMAGES, "--out", tmp_path / "o")
    assert code == 3 and isinstance(exc, SystemExit), text
    assert text.strip().splitlines() == [
        "error: unexpected KeyError: 'a bug' (a bug in onnx-saliency; please report it with the command; "
        "ONNX_SALIENCY_TRACEBACK=1 shows the traceback)"]


# --- class 4: no silent wrong answers ----------------------------------------------------------------------

def _bn_model(path, training: int, use_stats: bool = False):
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"],
                              ["n", "rm", "rv"] if training else ["n"], training_mode=training, name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1, name="fc")]
    inits = {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "s": np.ones(6, np.float32),
             "b": np.zeros(6, np.float32), "m": rng.standard_normal(6).astype(np.float32),
             "v": np.full(6, 2.0, np.float32), "fc": rng.standard_normal((3, 6)).astype(np.float32)}
    outputs = [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 3])]
    if use_stats:
        outputs.append(helper.make_tensor_value_info("rm", onnx.TensorProto.FLOAT, [6]))
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                                                          [None, 3, 16, 16])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="tf"))
    onnx.save(model, str(path))
    return path


_BN = {}


@settings(FEW, max_examples=15)
@given(seed=st.integers(0, 2 ** 16), method=st.sampled_from(["gradcam", "gradient", "lrp"]))
def test_training_mode_batchnorm_maps_do_not_depend_on_the_batch(seed, method):
    from onnx_saliency import Explainer

    if not _BN:
        _BN["train"] = Explainer(_bn_model(_WORK / "bn_train.onnx", training=1))
        _BN["eval"] = Explainer(_bn_model(_WORK / "bn_eval.onnx", training=0))
    x = list(np.random.default_rng(seed).integers(0, 255, (3, 16, 16, 3), np.uint8))
    train, evaluated = _BN["train"], _BN["eval"]
    alone = train.explain(x[:1], method=method).maps[0]
    together = train.explain(x, method=method).maps[0]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone, evaluated.explain(x[:1], method=method).maps[0], rtol=1e-5, atol=1e-6)
    assert any("training mode" in text for text in train.assumptions)


def test_training_mode_batchnorm_whose_statistics_are_used_is_refused(tmp_path):
    path = _bn_model(tmp_path / "bn_stats.onnx", training=1, use_stats=True)
    _one_error_line(*_cli("info", path), "bn_stats.onnx", "training mode", "'bn'")


def test_training_mode_note_is_said_and_recorded(tmp_path):
    import json

    path = _bn_model(tmp_path / "bn_train.onnx", training=1)
    out = tmp_path / "out"
    code, text, exc = _cli("explain", path, IMAGES, "--out", out)
    assert code == 0, text
    assert "training mode" in text
    assert any("training mode" in a for a in json.loads((out / "img0" / "gradcam.json").read_text())["assumptions"])


@pytest.mark.parametrize("change", [["--target", "2"], ["--layer", "a1"], ["--preset", "raw"],
                                    ["-m", "smoothgrad", "--option", "n=3"]])
def test_resume_redoes_outputs_made_with_other_settings(tmp_path, change):
    base = ["-m", "smoothgrad", "--option", "n=2"] if "-m" in change else []
    out = tmp_path / "out"
    first = _cli("explain", MODEL, IMAGES, *base, "--out", out, "-q")
    assert first[0] == 0, first[1]
    again = _cli("explain", MODEL, IMAGES, *base, "--out", out, "--resume", "-q")
    assert "2 already complete" in again[1], again[1]
    args = change if "-m" in change else base + change
    changed = _cli("explain", MODEL, IMAGES, *args, "--out", out, "--resume", "-q")
    assert changed[0] == 0 and "already complete" not in changed[1], changed[1]
    assert "2 already complete" in _cli("explain", MODEL, IMAGES, *args, "--out", out, "--resume", "-q")[1]


def test_a_fixed_batch_of_one_model_runs_at_the_default_batch_size(tmp_path):
    import onnx

    model = onnx.load(str(MODEL))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "batch1.onnx"
    onnx.save(model, str(path))
    code, text, exc = _cli("explain", path, IMAGES, "-m", "gradcam", "-m", "integrated-gradients",
                           "--option", "steps=3", "--out", tmp_path / "o", "-q")
    assert code == 0 and exc is None, text


# --- class 6: side files are read without trusting them ----------------------------------------------------

def _fifo(path):
    import os

    os.mkfifo(path)
    return path


def _side(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _deep(depth):
    return ("[" * depth + "]" * depth).encode()


SIDE_CASES = [
    ("labels.txt", lambda p: _side(p, "labels.txt", "caf\xe9\nthé\n".encode("latin-1")), "not UTF-8"),
    ("labels.json", lambda p: _side(p, "labels.json", _deep(100000)), "nested too deeply"),
    ("labels.txt", lambda p: _fifo(p / "labels.txt"), "FIFO"),
    ("labels.txt", lambda p: p, "folder"),
]


@pytest.mark.parametrize("name,make,needle", SIDE_CASES, ids=["latin1", "deep", "fifo", "folder"])
def test_labels_side_file(tmp_path, name, make, needle):
    path = make(tmp_path)
    _one_error_line(*_cli("explain", MODEL, IMAGES, "--labels", path, "--out", tmp_path / "o"),
                    "--labels", needle)


@pytest.mark.parametrize("make,needle", [
    (lambda p: _side(p, "r.json", '{"rules": [{"op": "Conv", "rule": "é"}]}'.encode("latin-1")), "not UTF-8"),
    (lambda p: _side(p, "r.json", _deep(100000)), "nested too deeply"),
    (lambda p: _fifo(p / "r.json"), "FIFO")], ids=["latin1", "deep", "fifo"])
def test_rule_map_side_file(tmp_path, make, needle):
    path = make(tmp_path)
    _one_error_line(*_cli("explain", MODEL, IMAGES, "-m", "lrp", "--rule-map", path, "--out", tmp_path / "o"),
                    "--rule-map", needle)


@pytest.mark.parametrize("make,needle", [
    (lambda p: _side(p, "a.json", '{"images": {"é": 1}}'.encode("latin-1")), "not UTF-8"),
    (lambda p: _side(p, "a.json", _deep(100000)), "nested too deeply"),
    (lambda p: _fifo(p / "a.json"), "FIFO")], ids=["latin1", "deep", "fifo"])
def test_annotations_side_file(tmp_path, make, needle):
    path = make(tmp_path)
    _one_error_line(*_cli("evaluate", MODEL, IMAGES, "--annotations", path, "--out", tmp_path / "o"),
                    "--annotations", needle)


@FEW
@given(depth=st.integers(1, 3000), text=st.binary(max_size=64))
def test_any_labels_bytes_are_labels_or_one_line(depth, text):
    from onnx_saliency.intake.labels import load_labels

    for name, data in (("l.json", _deep(depth)), ("l.txt", text), ("l.json", text)):
        path = _WORK / name
        path.write_bytes(data)
        try:
            labels = load_labels(path)
        except SaliencyError as err:
            assert str(err).startswith(f"--labels {path}") and "\n" not in str(err)
            continue
        assert all(isinstance(label, str) for label in labels)


def _annotations(tmp_path, entries):
    import json

    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def test_evaluate_refuses_an_annotated_class_beyond_the_model(tmp_path):
    ann = _annotations(tmp_path, {"img0.png": {"class_index": 7, "boxes_in_file": [[1, 1, 8, 8]]},
                                  "img1.png": {"class_index": 1, "boxes_in_file": [[1, 1, 8, 8]]}})
    _one_error_line(*_cli("evaluate", MODEL, IMAGES, "--annotations", ann, "--target", "gt",
                          "--metric", "pointing-game", "--out", tmp_path / "o"), "class 7", "4 classes")


@settings(FEW, max_examples=15)
@example(box=(20, 2, 5, 5))   # wholly right of the 16x16 image
@example(box=(-30, -30, 10, 10))  # wholly above and left
@example(box=(10, 10, 20, 20))  # partly outside: clipped, scored
@given(box=st.tuples(st.integers(-40, 40), st.integers(-40, 40), st.integers(1, 30), st.integers(1, 30)))
def test_evaluate_skips_an_image_whose_box_misses_it_and_keeps_the_others(box):
    x0, y0, w, h = box
    b = [x0, y0, x0 + w, y0 + h]
    outside = b[2] <= 0 or b[3] <= 0 or b[0] >= 16 or b[1] >= 16
    tmp = Path(tempfile.mkdtemp(dir=_WORK))
    ann = _annotations(tmp, {"img0.png": {"class_index": 1, "boxes_in_file": [b]},
                             "img1.png": {"class_index": 1, "boxes_in_file": [[2, 2, 9, 9]]}})
    code, text, exc = _cli("evaluate", MODEL, IMAGES, "--annotations", ann, "--metric", "pointing-game",
                           "--out", tmp / "o", "-q")
    assert exc is None or isinstance(exc, SystemExit), text
    if outside:
        assert code == 1 and "img0.png" in text and "lies outside the 16x16 image" in text, text
        assert "1 of 2 image(s) failed and were skipped: img0.png" in text
    else:
        assert code == 0, text
    assert (tmp / "o" / "metrics.json").is_file() if (tmp / "o").exists() else code != 0


def test_evaluate_skips_an_unreadable_image_like_explain(tmp_path):
    import json

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in IMAGES.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, text, exc = _cli("evaluate", MODEL, folder, "--metric", "deletion", "--out", tmp_path / "o")
    assert code == 1 and exc is None or isinstance(exc, SystemExit), text
    assert "broken.png" in text and "1 of 3 image(s) failed and were skipped" in text
    result = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "broken.png" in result["skipped"] and len(result["images"]) == 2


# --- generated variants for classes 2 and 3 ----------------------------------------------------------------

@FEW
@given(hops=st.lists(st.sampled_from([".", "sub/..", "sub/./..", "link"]), max_size=4),
       via=st.sampled_from(["path", "symlink", "hardlink"]))
def test_no_spelling_of_an_input_can_be_written_over(hops, via):
    import os

    from onnx_saliency.guard import note_input
    from onnx_saliency.output.writers import write_bytes

    root = Path(tempfile.mkdtemp(dir=_WORK))
    (root / "sub").mkdir()
    (root / "link").symlink_to(root)
    source = root / "model.onnx"
    source.write_bytes(b"precious")
    note_input(source)
    name = "model.onnx"
    if via == "symlink":
        name = "alias.onnx"
        (root / name).symlink_to(source)
    elif via == "hardlink":
        name = "hard.onnx"
        os.link(source, root / name)
    target = root.joinpath(*hops, name)
    with pytest.raises(SaliencyError, match="input of this run"):
        write_bytes(target, b"clobbered")
    assert source.read_bytes() == b"precious"


@FEW
@given(opset=st.integers(29, 500), shape=st.sampled_from([(1, 32), (2, 16), (16, 2), (32, 1), (8, 4)]),
       which=st.sampled_from(["opset", "shape"]))
def test_models_onnxruntime_refuses_are_one_line(opset, shape, which):
    from onnx_saliency import Explainer

    change = _opset(opset) if which == "opset" else _fc_shape(shape)
    path = _variant(Path(tempfile.mkdtemp(dir=_WORK)), "v.onnx", change)
    try:
        Explainer(path).check_session()
    except SaliencyError as err:
        text = str(err)
        assert text.startswith("v.onnx: ") or text.startswith(str(path)), text
        assert "\n" not in text and "[ONNXRuntimeError]" not in text and "onnxruntime::" not in text
        return
    raise AssertionError(f"{which} variant loaded: {opset} {shape}")
