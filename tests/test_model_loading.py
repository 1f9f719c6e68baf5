"""Model intake on hostile files: external data stays inside the model's folder, foreign files are named,
weights are checked, and the ONNX file is never written to."""

import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_saliency.intake import model as model_module
from onnx_saliency.cli.main import main
from onnx_saliency.errors import SaliencyError
from onnx_saliency.intake.model import load_model, read_model
from tests.graphs import tiny_classifier
from tests.open_watch import opened_files


def _external(folder, location="w.bin"):
    """The tiny classifier with every weight in one external file `location` (relative to the model)."""
    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(tiny_classifier(folder / "plain.onnx")))
    path = folder / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
              size_threshold=0)
    (folder / "plain.onnx").unlink()
    if location != "w.bin":
        m = onnx.load(str(path), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(m, str(path))  # external entries only: the data stays where it is
    return path


def _images(folder, n=2):
    import cv2

    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i}.png"), np.full((18, 18, 3), 40 * i + 20, np.uint8))
    return folder


def test_external_data_model_loads_and_matches_the_inline_one(tmp_path):
    ext = _external(tmp_path / "model")
    inline = tiny_classifier(tmp_path / "inline.onnx")
    a, b = load_model(ext), load_model(inline)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in a.canonical.graph.initializer)
    for ta, tb in zip(a.original.graph.initializer, b.original.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb))


def test_explain_never_modifies_model_files(tmp_path):
    ext = _external(tmp_path / "model")
    files = [ext, tmp_path / "model" / "w.bin"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in files]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(ext), str(_images(tmp_path / "imgs")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in files] == before
    assert sorted(os.listdir(tmp_path / "model")) == ["ext.onnx", "w.bin"]  # no temp or converted copies


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_file", "symlink_folder"])
def test_external_data_outside_the_folder_is_refused_without_opening_it(tmp_path, kind):
    folder = tmp_path / "model"
    path = _external(folder)
    outside = tmp_path / "outside.bin"
    os.replace(folder / "w.bin", outside)  # valid weights, just in the wrong place
    location = {"dotdot": "../outside.bin", "absolute": str(outside), "symlink_file": "w.bin",
                "symlink_folder": "data/outside.bin"}[kind]
    if kind == "symlink_file":
        os.symlink(outside, folder / "w.bin")
    if kind == "symlink_folder":
        os.symlink(tmp_path, folder / "data")
    path = _external(folder, location) if kind != "symlink_file" else path
    out = tmp_path / "out"
    images = _images(tmp_path / "imgs")
    with opened_files(tmp_path) as seen:
        result = CliRunner().invoke(main, ["explain", str(path), str(images), "--out", str(out)])
    assert result.exit_code == 2
    assert result.output == (f"error: {path}: external data of tensor 'w1' points outside the model folder "
                             f"({location!r}); refusing to read it\n")
    assert "outside.bin" not in seen and not out.exists()
    with opened_files(tmp_path) as control:  # the watch does see reads of that file
        outside.read_bytes()
    assert "outside.bin" in control


def test_external_data_missing_short_or_misdeclared(tmp_path):
    path = _external(tmp_path / "model")
    data = tmp_path / "model" / "w.bin"
    full = data.read_bytes()
    data.write_bytes(full[:1000])
    with pytest.raises(SaliencyError) as err:
        read_model(path)
    assert str(err.value) == (f"{path}: external data of tensor 'w2' needs bytes 896..3200 of 'w.bin', "
                              "which has 1000 bytes")
    data.unlink()
    with pytest.raises(SaliencyError, match=r"external data file 'w.bin' of tensor 'w1' is missing"):
        read_model(path)
    data.write_bytes(full)
    m = onnx.load(str(path), load_external_data=False)
    m.graph.initializer[0].external_data[2].value = "100"  # length of w1 (864 bytes of float32 8x3x3x3)
    onnx.save(m, str(path))
    with pytest.raises(SaliencyError) as err:
        read_model(path)
    assert str(err.value) == (f"{path}: external data of tensor 'w1' has 100 bytes in 'w.bin'; its shape "
                              "[8, 3, 3, 3] needs 864")


def test_models_over_two_gib_are_refused_before_reading(tmp_path, monkeypatch):
    path = _external(tmp_path / "model")
    total = path.stat().st_size + (tmp_path / "model" / "w.bin").stat().st_size
    monkeypatch.setattr(model_module, "MAX_MODEL_BYTES", total - 1)
    with opened_files(tmp_path / "model") as seen:
        with pytest.raises(SaliencyError, match=rf"{total} bytes with its external data; models over 2 GiB are not"):
            read_model(path)
    assert "w.bin" not in seen
    monkeypatch.setattr(model_module, "MAX_MODEL_BYTES", 100)
    plain = tiny_classifier(tmp_path / "plain.onnx")
    with pytest.raises(SaliencyError, match="over protobuf's 2 GiB limit; models this large must keep"):
        read_model(plain)


@pytest.mark.parametrize("content, what", [
    (b"PK\x03\x04" + bytes(60), "a zip archive: a PyTorch .pt/.pth, Keras .keras or NumPy .npz file?"),
    (b"\x89HDF\r\n\x1a\n" + bytes(60), "an HDF5 file: a Keras .h5 model?"),
    (b"\x80\x04\x95" + bytes(60), "a Python pickle: a PyTorch checkpoint?"),
    (b"\x1c\x00\x00\x00TFL3" + bytes(60), "a TensorFlow Lite model"),
    (b"\x89PNG\r\n\x1a\n" + bytes(60), "a PNG image"),
    (b"\x93NUMPY\x01\x00" + bytes(60), "a NumPy .npy array"),
    (b"graph {\n  node: 'conv'\n}\n", "a text file"),
    (b"", "an empty file"),
])
def test_foreign_files_are_named(tmp_path, content, what):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(SaliencyError) as err:
        read_model(path)
    assert str(err.value) == f"{path}: not a readable ONNX model ({what})"


def test_nan_weights_are_refused_inf_allowed(tmp_path):
    m = onnx.load(str(tiny_classifier(tmp_path / "t.onnx")))
    fc = next(t for t in m.graph.initializer if t.name == "fc")
    values = onnx.numpy_helper.to_array(fc).copy()
    values[0, 0] = np.inf
    fc.CopyFrom(onnx.numpy_helper.from_array(values, "fc"))
    onnx.save(m, str(tmp_path / "inf.onnx"))
    read_model(tmp_path / "inf.onnx")  # -inf pads exist in real exports: not refused at load
    values[1, :3] = np.nan
    fc.CopyFrom(onnx.numpy_helper.from_array(values, "fc"))
    onnx.save(m, str(tmp_path / "nan.onnx"))
    with pytest.raises(SaliencyError) as err:
        read_model(tmp_path / "nan.onnx")
    assert str(err.value) == f"{tmp_path / 'nan.onnx'}: weight 'fc' contains NaN (3 of 32 values)"


def _mapped_weights_model(path, nan_at=(), dtype=np.float32):
    """x (1, 3, 8, 8) -> flatten -> two large dense weights (kept in the file, not parsed), NaN at flat indices
    `nan_at` of the concatenated weights; returns the path."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((192, 160)).astype(dtype)  # 30720 values: above the store's threshold
    w2 = rng.standard_normal((160, 131)).astype(dtype)  # odd sizes: values straddle any block size
    flat = np.concatenate([w1.ravel(), w2.ravel()])
    flat[list(nan_at)] = np.nan
    w1, w2 = flat[:w1.size].reshape(w1.shape), flat[w1.size:].reshape(w2.shape)
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w1"], ["h"]),
         helper.make_node("MatMul", ["h", "w2"], ["y"])], "m",
        [helper.make_tensor_value_info("x", t, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", t, [1, 131])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("block", [4099, 1 << 16, 16 << 20])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_one_read_hashes_the_file_and_finds_nan_in_mapped_weights(tmp_path, monkeypatch, block, dtype):
    """load_model reads the file once, on a second thread: the sha256 of every byte and a NaN check of the
    weights that stay in the file, with blocks of any size (values never split between two blocks)."""
    import hashlib

    from onnx_saliency.intake.wire import read_structure

    monkeypatch.setattr(model_module, "_BLOCK", block)
    clean = _mapped_weights_model(tmp_path / "clean.onnx", dtype=dtype)
    assert len(read_structure(clean, model_module.STORE_MIN_ELEMENTS)[1]) == 2  # both weights stay in the file
    assert load_model(clean).sha256 == hashlib.sha256(clean.read_bytes()).hexdigest()
    n1 = 192 * 160
    for at in ([0], [n1 - 1], [n1], [n1 + 160 * 131 - 1], [5, 1025, 1026, n1 + 7]):
        path = _mapped_weights_model(tmp_path / f"nan{at[0]}.onnx", nan_at=at, dtype=dtype)
        with pytest.raises(SaliencyError) as err:
            load_model(path)
        first = "w1" if at[0] < n1 else "w2"
        count = sum(1 for i in at if (i < n1) == (first == "w1"))
        total = n1 if first == "w1" else 160 * 131
        assert str(err.value) == f"{path}: weight {first!r} contains NaN ({count} of {total} values)"
        with pytest.raises(SaliencyError) as err:
            read_model(path)  # the same check without hashing (only the weights' bytes are read)
        assert f"weight {first!r} contains NaN ({count} of {total} values)" in str(err.value)


def test_fuzzer_findings_are_clean_errors(tmp_path):
    """Two inputs atheris found that used to escape as UnicodeDecodeError and ValueError."""
    data = tiny_classifier(tmp_path / "t.onnx").read_bytes()
    assert data.count(b"flatten") == 1
    (tmp_path / "name.onnx").write_bytes(data.replace(b"flatten", b"fla\xfften"))  # node name, not UTF-8
    with pytest.raises(SaliencyError) as err:
        load_model(tmp_path / "name.onnx")
    assert str(err.value) == (f"{tmp_path / 'name.onnx'}: not a readable ONNX model (a name or string that is not "
                              r"UTF-8: NodeProto.name b'fla\xfften')")
    m = onnx.load(str(tmp_path / "t.onnx"))
    next(t for t in m.graph.initializer if t.name == "w2").dims[1] = 4  # 288 values declared, 576 stored
    onnx.save(m, str(tmp_path / "dims.onnx"))
    with pytest.raises(SaliencyError) as err:
        load_model(tmp_path / "dims.onnx")
    assert str(err.value) == (f"{tmp_path / 'dims.onnx'}: weight 'w2' does not hold data of its declared shape "
                              "[8, 4, 3, 3] and type (ValueError: cannot reshape array of size 576 into shape "
                              "(8,4,3,3))")
