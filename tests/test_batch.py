"""Batch runs: bad images are skipped and summarised, a killed run resumes to complete outputs, NaN is
traced to its node per image, constant maps are flagged, big batches are split to a memory budget."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_saliency.cli.main import main
from onnx_saliency.output.sidecar import outputs_complete
from tests.graphs import tiny_classifier

ROOT = Path(__file__).resolve().parents[1]
BROKEN = {3: "text", 14: "empty", 22: "truncated", 37: "bomb", 49: "jpeg_garbage"}


def _broken_bytes(kind: str) -> bytes:
    ok, png = cv2.imencode(".png", np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    png = png.tobytes()
    if kind == "text":
        return b"not an image\n"
    if kind == "empty":
        return b""
    if kind == "truncated":
        return png[: len(png) // 2]
    if kind == "bomb":
        return png[:16] + struct.pack(">II", 50000, 50000) + png[24:]
    return b"\xff\xd8\xff\xe0" + bytes(100)


def _reason(path: Path, kind: str) -> str:
    return {"text": "not a readable image (unknown format; supported: PNG, JPEG, BMP, GIF, WebP, TIFF, PNM)",
            "empty": "not a readable image (empty file)",
            "truncated": "not a readable image (PNG data truncated or corrupt)",
            "bomb": "image has 2500000000 pixels, more than the limit of 100000000",
            "jpeg_garbage": "not a readable image (corrupt JPEG header)"}[kind]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A tiny model and 50 images, 5 of them broken."""
    root = tmp_path_factory.mktemp("batch")
    model = tiny_classifier(root / "tiny.onnx")
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(50):
        path = folder / f"img{i:02d}.png"
        if i in BROKEN:
            path.write_bytes(_broken_bytes(BROKEN[i]))
        else:
            cv2.imwrite(str(path), rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    good = [folder / f"img{i:02d}.png" for i in range(50) if i not in BROKEN]
    return model, folder, good


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _summary(folder):
    names = ", ".join(f"img{i:02d}.png" for i in sorted(BROKEN))
    return f"error: 5 of 50 image(s) failed and were skipped: {names}"


def _maps(out, images):
    return {p.stem: np.load(out / p.stem / "gradcam.npy") for p in images}


def test_bad_images_are_reported_and_skipped(batch, tmp_path):
    model, folder, good = batch
    out = tmp_path / "out"
    result = _invoke("explain", model, folder, "--out", out, "--batch-size", 16)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = [f"error: {folder / f'img{i:02d}.png'}: {_reason(folder, kind)}" for i, kind in sorted(BROKEN.items())]
    assert errors == expected + [_summary(folder)]
    assert result.stdout.splitlines()[-1] == f"wrote 45 image(s) x 1 method(s) to {out}"
    sha = json.loads((out / good[0].stem / "gradcam.json").read_text())["model_sha256"]
    assert all(outputs_complete(out, p, "gradcam", sha) for p in good)
    assert sorted(os.listdir(out)) == sorted(p.stem for p in good)  # nothing at all for the broken ones


KILLER = textwrap.dedent("""
    import os, signal, sys
    real_replace, renames = os.replace, [0]

    def replace(src, dst):  # SIGKILL between writing a temp file and renaming it: a torn run
        renames[0] += 1
        if renames[0] == int(os.environ["KILL_AT_RENAME"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
    from onnx_saliency.cli.main import main
    main(sys.argv[1:])
""")


def test_killed_run_resumes_to_complete_valid_outputs(batch, tmp_path):
    model, folder, good = batch
    out = tmp_path / "out"
    # 3 renames per image (npy, png, json): killed with 20 images done and the 21st half written
    env = {**os.environ, "KILL_AT_RENAME": str(3 * 20 + 3), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, "explain", str(model), str(folder), "--out", str(out),
                           "--batch-size", "8"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    sha = json.loads((out / good[0].stem / "gradcam.json").read_text())["model_sha256"]
    done = [p for p in good if outputs_complete(out, p, "gradcam", sha)]
    assert done == good[:20]
    torn = out / good[20].stem
    assert sorted(f for f in os.listdir(torn) if not f.startswith(".")) == ["gradcam.npy", "gradcam.png"]
    assert [p.name for p in torn.glob(".gradcam.json*.tmp")]  # the unrenamed temp file, never the final name
    first_mtime = (out / good[0].stem / "gradcam.npy").stat().st_mtime_ns

    result = _invoke("explain", model, folder, "--out", out, "--batch-size", 8, "--resume")
    assert result.exit_code == 1  # the 5 broken images still fail
    assert result.stdout.splitlines()[-1] == (f"wrote 25 image(s) x 1 method(s) to {out}; "
                                              "20 already complete (--resume)")
    assert all(outputs_complete(out, p, "gradcam", sha) for p in good)
    assert not list(out.rglob("*.tmp"))
    assert (out / good[0].stem / "gradcam.npy").stat().st_mtime_ns == first_mtime  # not recomputed

    clean = tmp_path / "clean"
    assert _invoke("explain", model, folder, "--out", clean, "--batch-size", 8).exit_code == 1
    resumed, fresh = _maps(out, good), _maps(clean, good)
    for stem in fresh:
        np.testing.assert_allclose(resumed[stem], fresh[stem], rtol=1e-6, atol=1e-7)


def test_resume_redoes_damaged_outputs(batch, tmp_path, capfd):
    model, folder, good = batch
    images = good[:5]
    out = tmp_path / "out"
    assert _invoke("explain", model, *images, "--out", out).exit_code == 0
    (out / images[0].stem / "gradcam.npy").write_bytes(b"\x93NUMPY garbage")
    (out / images[1].stem / "gradcam.json").unlink()
    sidecar = out / images[2].stem / "gradcam.json"
    sidecar.write_text(sidecar.read_text()[:50])
    picture = out / images[3].stem / "gradcam.png"
    picture.write_bytes(picture.read_bytes()[:-40])  # cut inside the image data
    capfd.readouterr()
    result = _invoke("explain", model, *images, "--out", out, "--resume")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-1] == f"wrote 4 image(s) x 1 method(s) to {out}; 1 already complete (--resume)"
    assert capfd.readouterr().err == "" and result.stderr == ""  # libpng's complaint about the cut PNG is muted
    sha = json.loads(sidecar.read_text())["model_sha256"]
    assert all(outputs_complete(out, p, "gradcam", sha) for p in images)


def _div_model(path):
    """x / relu(x) before the first conv: Inf wherever a pixel is darker than mid-grey (tf preset < 0)."""
    m = onnx.load(str(tiny_classifier(path)))
    m.graph.node.insert(0, helper.make_node("Relu", ["input"], ["r"], name="relu0"))
    m.graph.node.insert(1, helper.make_node("Div", ["input", "r"], ["d"], name="div"))
    next(n for n in m.graph.node if n.name == "conv1").input[0] = "d"
    onnx.save(m, str(path))
    return path


def test_nan_is_traced_to_its_node_and_only_that_image_fails(tmp_path):
    model = _div_model(tmp_path / "div.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, value in (("bright", 200), ("dark", 20), ("bright2", 180)):
        cv2.imwrite(str(folder / f"{name}.png"), np.full((16, 16, 3), value, np.uint8))
    out = tmp_path / "out"
    for method in ("gradcam", "gradient"):
        result = _invoke("explain", model, folder, "--out", out, "-m", method)
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [
            f"error: {folder / 'dark.png'}: -m {method}: div.onnx: non-finite values (NaN/Inf) in 'logits'; "
            "they first appear at node 'div' (Div), output 'd'",
            "error: 1 of 3 image(s) failed and were skipped: dark.png"]
        assert sorted(os.listdir(out)) == ["bright", "bright2"]


def test_constant_maps_are_flagged_on_stdout_and_in_the_sidecar(tmp_path):
    m = onnx.load(str(tiny_classifier(tmp_path / "t.onnx")))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    m.graph.node.insert(0, helper.make_node("Mul", ["input", "zero"], ["blind"], name="blind"))
    next(n for n in m.graph.node if n.name == "conv1").input[0] = "blind"
    onnx.save(m, str(tmp_path / "blind.onnx"))
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((16, 16, 3), 90, np.uint8))
    out = tmp_path / "out"
    result = _invoke("explain", tmp_path / "blind.onnx", image, "-m", "gradient", "--out", out)
    assert result.exit_code == 0
    warning = f"warning: {image}: the gradient map is constant (0); saved as is, not normalised"
    assert warning in result.stdout.splitlines()
    meta = json.loads((out / "a" / "gradient.json").read_text())["map"]
    assert meta["constant"] is True and meta["all_zero"] is True


def test_memory_budget_splits_batches_with_identical_results(batch, tmp_path):
    model, folder, good = batch
    from onnx_saliency import Explainer

    per_image = Explainer(model).engine.bytes_per_image((16, 16), backward=True)
    small, big = tmp_path / "small", tmp_path / "big"
    result = _invoke("explain", model, *good[:8], "--out", small, "--batch-size", 8,
                     "--memory-budget", str(3 * per_image), "--report")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("memory  batch of 8 split into runs of 3 (with backward pass: ~") for line in lines)
    peak = [line for line in lines if line.startswith("memory  peak resident ")]
    assert len(peak) == 1 and peak[0].endswith(" MiB (getrusage ru_maxrss)")
    assert float(peak[0].split()[3]) > 10
    assert _invoke("explain", model, *good[:8], "--out", big, "--batch-size", 8).exit_code == 0
    for p in good[:8]:
        np.testing.assert_allclose(np.load(small / p.stem / "gradcam.npy"), np.load(big / p.stem / "gradcam.npy"),
                                   rtol=1e-5, atol=1e-6)


def test_engine_splits_runs_to_the_budget(tmp_path):
    from onnx_saliency import Explainer

    ex = Explainer(tiny_classifier(tmp_path / "t.onnx"))
    x = np.random.default_rng(0).standard_normal((10, 3, 16, 16)).astype(np.float32)
    whole = ex.engine.run(x, wrt=["a2"], batch_size=10)
    ex.engine.memory_budget = 4 * ex.engine.bytes_per_image((16, 16), backward=True)
    calls = ex.engine.calls
    split = ex.engine.run(x, wrt=["a2"], batch_size=10)
    assert ex.engine.calls - calls == 3  # 4 + 4 + 2
    for k in whole:
        np.testing.assert_allclose(split[k], whole[k], rtol=1e-5, atol=1e-6)
    assert ex.engine.bytes_per_image((16, 16), backward=False) == ex.engine.bytes_per_image((16, 16)) // 4
    # conv1 (8x16x16) + relu1 + pool + conv2 ... : every activation of one 16x16 image, 4 bytes each
    assert ex.engine.bytes_per_image((16, 16)) >= 4 * (2 * 8 * 16 * 16 + 3 * 8 * 8 * 8)
    assert ex.engine.bytes_per_image((32, 32), backward=False) > 3.5 * ex.engine.bytes_per_image((16, 16), False)


def test_decoder_chatter_never_reaches_stderr(batch, tmp_path, capfd):
    """libpng/libjpeg/OpenCV print to file descriptor 2 themselves; only our lines may appear there."""
    model, folder, good = batch
    rng = np.random.default_rng(5)
    bad = []
    for ext in (".png", ".jpg", ".gif", ".webp", ".bmp"):
        ok, buf = cv2.imencode(ext, rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        data = bytearray(buf.tobytes())
        for i in range(len(data) // 3, len(data) // 3 + 24):
            data[i] ^= 0x5A
        bad.append(tmp_path / f"corrupt_{ext[1:]}{ext}")
        bad[-1].write_bytes(bytes(data[: len(data) * 3 // 4]))
    capfd.readouterr()
    result = _invoke("explain", model, good[0], *bad, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert capfd.readouterr().err == ""  # nothing below Python's sys.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 6 and all(line.startswith("error: ") for line in lines)


def test_inf_weight_and_nan_input_are_named(tmp_path):
    from onnx_saliency import Explainer
    from onnx_saliency.errors import NumericalError, SaliencyError

    m = onnx.load(str(tiny_classifier(tmp_path / "t.onnx")))
    fc = next(t for t in m.graph.initializer if t.name == "fc")
    values = onnx.numpy_helper.to_array(fc).copy()
    values[:, 0] = np.inf  # allowed at load (exporters use -inf pads); poisons every score at run time
    fc.CopyFrom(onnx.numpy_helper.from_array(values, "fc"))
    onnx.save(m, str(tmp_path / "inf.onnx"))
    ex = Explainer(tmp_path / "inf.onnx")
    with pytest.raises(NumericalError) as err:
        ex.explain([np.full((16, 16, 3), 200, np.uint8)], method="gradient")
    assert str(err.value).endswith("they first appear at node 'fc' (Gemm), output 'logits', which reads weight "
                                   "'fc' holding NaN/Inf")
    x = np.zeros((1, 3, 16, 16), np.float32)
    x[0, 1, 2, 3] = np.nan
    with pytest.raises(SaliencyError, match="input array contains NaN or Inf"):
        Explainer(tiny_classifier(tmp_path / "ok.onnx")).explain(x)
