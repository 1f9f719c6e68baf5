"""A corpus of bad inputs (models, images, annotation files, option combinations): each gives its exact
error lines on stderr, a non-zero exit, a clean stdout and nothing written.

Exit 2: usage, option or model errors, found before any image is processed. Exit 1: every image of the run
was refused (one line each, then the summary), so nothing was written either.
"""

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_saliency.cli.main import main
from onnx_saliency.methods import method_names
from tests.graphs import make_model, tiny_classifier
from tests.open_watch import opened_files


@dataclass
class Env:
    tmp: Path
    model: Path      # a good tiny classifier
    imgs: Path       # a folder of two good images
    img: Path        # one good 20x24 image
    out: Path

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def png(self, name: str, array) -> Path:
        ok, buf = cv2.imencode(".png", np.asarray(array))
        return self.file(name, buf.tobytes())


@pytest.fixture()
def env(tmp_path):
    model = tiny_classifier(tmp_path / "tiny.onnx")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(imgs / f"good{i}.png"), rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    return Env(tmp_path, model, imgs, imgs / "good0.png", tmp_path / "out")


# --- bad models ------------------------------------------------------------------------------------------

def _saved(e: Env, name: str, model: onnx.ModelProto) -> Path:
    path = e.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _external(e: Env, location: str, symlink: bool = False) -> Path:
    folder = e.tmp / "ext"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(onnx.load(str(e.model)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    os.replace(folder / "w.bin", e.tmp / "outside.bin")
    if symlink:
        os.symlink(e.tmp / "outside.bin", folder / "w.bin")
        return path
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(m, str(path))
    return path


def _nan_weights(e: Env) -> Path:
    m = onnx.load(str(e.model))
    w = next(t for t in m.graph.initializer if t.name == "b1")
    values = onnx.numpy_helper.to_array(w).copy()
    values[2] = np.nan
    w.CopyFrom(onnx.numpy_helper.from_array(values, "b1"))
    return _saved(e, "nan.onnx", m)


def _vector_input(e: Env) -> Path:
    m = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")], [("x", (None, 8))],
                   [("y", (None, 3))], {"w": np.ones((3, 8), np.float32)})
    return _saved(e, "vector.onnx", m)


def _sin(e: Env) -> Path:
    path = tiny_classifier(e.tmp / "sin.onnx", extra_node=helper.make_node("Sin", ["a1"], ["s"], name="weird_sine"))
    m = onnx.load(str(path))
    next(n for n in m.graph.node if n.name == "pool").input[0] = "s"
    return _saved(e, "sin.onnx", m)


def _dangling(e: Env) -> Path:
    m = onnx.load(str(e.model))
    next(n for n in m.graph.node if n.name == "relu1").input[0] = "nowhere"
    return _saved(e, "dangling.onnx", m)


def _no_nodes(e: Env) -> Path:
    m = onnx.load(str(e.model))
    del m.graph.node[:]
    return _saved(e, "empty_graph.onnx", m)


# --- bad images ------------------------------------------------------------------------------------------

def _truncated_png(e: Env) -> Path:
    ok, buf = cv2.imencode(".png", np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return e.file("cut.png", buf.tobytes()[:300])


def _truncated_jpeg(e: Env) -> Path:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return e.file("cut.jpg", buf.tobytes()[:-200])


def _bomb(e: Env) -> Path:
    ok, buf = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))
    data = bytearray(buf.tobytes())
    data[16:24] = struct.pack(">II", 40000, 40000)
    return e.file("bomb.png", bytes(data))


def _hdr(e: Env) -> Path:
    ok, buf = cv2.imencode(".hdr", np.full((4, 4, 3), 0.5, np.float32))
    return e.file("radiance.png", buf.tobytes())


def _int16(e: Env) -> Path:
    ok, buf = cv2.imencode(".tiff", np.full((4, 4), -3, np.int16))
    return e.file("signed.tiff", buf.tobytes())


def _bad_annotations(e: Env, text: str) -> Path:
    return e.file("ann.json", text.encode())


SUPPORTED = "PNG, JPEG, BMP, GIF, WebP, TIFF, PNM"
UNREADABLE = "not a readable ONNX model"

# name: (arguments, expected stderr lines, exit code); lambdas take the Env
CASES = {
    # models
    "model_text": (lambda e: ["explain", e.file("model.onnx", b"ir_version: 8\n"), e.imgs],
                   lambda e: [f"error: {e.tmp / 'model.onnx'}: {UNREADABLE} (a text file)"], 2),
    "model_empty": (lambda e: ["explain", e.file("empty.onnx", b""), e.imgs],
                    lambda e: [f"error: {e.tmp / 'empty.onnx'}: {UNREADABLE} (an empty file)"], 2),
    "model_pytorch_zip": (lambda e: ["explain", e.file("net.onnx", b"PK\x03\x04\x14\x00" + bytes(90)), e.imgs],
                          lambda e: [f"error: {e.tmp / 'net.onnx'}: {UNREADABLE} (a zip archive: a PyTorch "
                                     ".pt/.pth, Keras .keras or NumPy .npz file?)"], 2),
    "model_keras_h5": (lambda e: ["explain", e.file("k.onnx", b"\x89HDF\r\n\x1a\n" + bytes(90)), e.imgs],
                       lambda e: [f"error: {e.tmp / 'k.onnx'}: {UNREADABLE} (an HDF5 file: a Keras .h5 model?)"], 2),
    "model_truncated": (lambda e: ["explain", e.file("cut.onnx", e.model.read_bytes()[:1000]), e.imgs],
                        lambda e: [f"error: {e.tmp / 'cut.onnx'}: {UNREADABLE} (DecodeError: Error parsing message "
                                   "with type 'onnx.ModelProto': Wire format was corrupt)"], 2),
    "model_random_bytes": (lambda e: ["explain", e.file("rnd.onnx", bytes(range(7, 256)) * 3), e.imgs],
                           lambda e: [f"error: {e.tmp / 'rnd.onnx'}: {UNREADABLE} (DecodeError: Error parsing "
                                      "message with type 'onnx.ModelProto': Wire format was corrupt)"], 2),
    "model_no_nodes": (lambda e: ["explain", _no_nodes(e), e.imgs],
                       lambda e: [f"error: {e.tmp / 'empty_graph.onnx'}: not an ONNX model (no graph nodes)"], 2),
    "model_folder": (lambda e: ["explain", (e.tmp / "dir.onnx").mkdir() or e.tmp / "dir.onnx", e.imgs],
                     lambda e: [f"error: {e.tmp / 'dir.onnx'}: no such model file"], 2),
    "external_dotdot": (lambda e: ["explain", _external(e, "../outside.bin"), e.imgs],
                        lambda e: [f"error: {e.tmp / 'ext' / 'm.onnx'}: external data of tensor 'w1' points outside "
                                   "the model folder ('../outside.bin'); refusing to read it"], 2),
    "external_absolute": (lambda e: ["explain", _external(e, str(e.tmp / "outside.bin")), e.imgs],
                          lambda e: [f"error: {e.tmp / 'ext' / 'm.onnx'}: external data of tensor 'w1' points outside "
                                     f"the model folder ({str(e.tmp / 'outside.bin')!r}); refusing to read it"], 2),
    "external_symlink": (lambda e: ["explain", _external(e, "w.bin", symlink=True), e.imgs],
                         lambda e: [f"error: {e.tmp / 'ext' / 'm.onnx'}: external data of tensor 'w1' points outside "
                                    "the model folder ('w.bin'); refusing to read it"], 2),
    "external_missing": (lambda e: ["explain", _external(e, "gone.bin"), e.imgs],
                         lambda e: [f"error: {e.tmp / 'ext' / 'm.onnx'}: external data file 'gone.bin' of tensor "
                                    "'w1' is missing"], 2),
    "nan_weights": (lambda e: ["explain", _nan_weights(e), e.imgs],
                    lambda e: [f"error: {e.tmp / 'nan.onnx'}: weight 'b1' contains NaN (1 of 8 values)"], 2),
    "no_image_input": (lambda e: ["explain", _vector_input(e), e.imgs],
                       lambda e: [f"error: {e.tmp / 'vector.onnx'}: expected exactly one 4-D float image input, "
                                  "found inputs ['x']"], 2),
    "unsupported_op": (lambda e: ["explain", _sin(e), e.imgs],
                       lambda e: [f"error: {e.tmp / 'sin.onnx'}: unsupported op(s) in 1 node(s): "
                                  "Sin (1: weird_sine)"], 2),
    "dangling_input": (lambda e: ["explain", _dangling(e), e.imgs],
                       lambda e: [f"error: {e.tmp / 'dangling.onnx'}: invalid ONNX model: Nodes in a graph must be "
                                  "topologically sorted, however input 'nowhere' of node: name: relu1 OpType: Relu "
                                  "is not output of any previous nodes."], 2),
    # images: each refused on its own line, then the summary; nothing else was given, so nothing is written
    "image_text": (lambda e: ["explain", e.model, e.file("notes.png", b"hello\n")],
                   lambda e: [f"error: {e.tmp / 'notes.png'}: not a readable image (unknown format; supported: "
                              f"{SUPPORTED})", "error: 1 of 1 image(s) failed and were skipped: notes.png"], 1),
    "image_empty": (lambda e: ["explain", e.model, e.file("zero.png", b"")],
                    lambda e: [f"error: {e.tmp / 'zero.png'}: not a readable image (empty file)",
                               "error: 1 of 1 image(s) failed and were skipped: zero.png"], 1),
    "image_truncated_png": (lambda e: ["explain", e.model, _truncated_png(e)],
                            lambda e: [f"error: {e.tmp / 'cut.png'}: not a readable image (PNG data truncated or "
                                       "corrupt)", "error: 1 of 1 image(s) failed and were skipped: cut.png"], 1),
    "image_truncated_jpeg": (lambda e: ["explain", e.model, _truncated_jpeg(e)],
                             lambda e: [f"error: {e.tmp / 'cut.jpg'}: not a readable image (JPEG data truncated: no "
                                        "end-of-image marker)",
                                        "error: 1 of 1 image(s) failed and were skipped: cut.jpg"], 1),
    "image_bomb": (lambda e: ["explain", e.model, _bomb(e)],
                   lambda e: [f"error: {e.tmp / 'bomb.png'}: image has 1600000000 pixels, more than the limit of "
                              "100000000", "error: 1 of 1 image(s) failed and were skipped: bomb.png"], 1),
    "image_over_max_pixels": (lambda e: ["explain", e.model, e.img, "--max-pixels", "479"],
                              lambda e: [f"error: {e.img}: image has 480 pixels, more than the limit of 479",
                                         "error: 1 of 1 image(s) failed and were skipped: good0.png"], 1),
    "image_signed_tiff": (lambda e: ["explain", e.model, _int16(e)],
                          lambda e: [f"error: {e.tmp / 'signed.tiff'}: unsupported sample type int16 (need 8/16-bit "
                                     "unsigned or float)", "error: 1 of 1 image(s) failed and were skipped: "
                                     "signed.tiff"], 1),
    "image_odd_format": (lambda e: ["explain", e.model, _hdr(e)],
                         lambda e: [f"error: {e.tmp / 'radiance.png'}: not a readable image (unknown format; "
                                    f"supported: {SUPPORTED})",
                                    "error: 1 of 1 image(s) failed and were skipped: radiance.png"], 1),
    "image_smaller_than_crop": (lambda e: ["explain", e.model, e.png("small.png", np.zeros((10, 12, 3), np.uint8)),
                                           "--resize-mode", "none"],
                                lambda e: [f"error: {e.tmp / 'small.png'}: image 0 is 10x12 after resizing, smaller "
                                           "than crop 16 (resize_mode none)",
                                           "error: 1 of 1 image(s) failed and were skipped: small.png"], 1),
    # options
    "batch_size_zero": (lambda e: ["explain", e.model, e.imgs, "--batch-size", "0"],
                        lambda e: ["error: --batch-size 0: must be at least 1"], 2),
    "max_pixels_zero": (lambda e: ["explain", e.model, e.imgs, "--max-pixels", "0"],
                        lambda e: ["error: --max-pixels 0: must be at least 1"], 2),
    "memory_budget_words": (lambda e: ["explain", e.model, e.imgs, "--memory-budget", "lots"],
                            lambda e: ["error: --memory-budget 'lots': expected a size such as 2GiB, 512MiB or a "
                                       "number of bytes"], 2),
    "unknown_method": (lambda e: ["explain", e.model, e.imgs, "-m", "magic"],
                       lambda e: [f"error: -m 'magic': unknown method; known: {', '.join(method_names())}"], 2),
    "unknown_layer": (lambda e: ["explain", e.model, e.imgs, "--layer", "zzz"],
                      lambda e: [f"error: --layer 'zzz': no such tensor, node or module in tiny.onnx "
                                 f"(see `onnx-saliency layers {e.model}`)"], 2),
    "target_out_of_range": (lambda e: ["explain", e.model, e.imgs, "--target", "99"],
                            lambda e: ["error: --target 99: class index out of range 0..3"], 2),
    "target_label_without_labels": (lambda e: ["explain", e.model, e.imgs, "--target", "cat"],
                                    lambda e: ["error: --target 'cat': not a class index and not a known label (the "
                                               "model has no labels; pass --labels FILE)"], 2),
    "targets_count_mismatch": (lambda e: ["explain", e.model, e.imgs, "--target", "1,2,3"],
                               lambda e: ["error: --target: 3 targets for 2 images"], 2),
    "option_without_value": (lambda e: ["explain", e.model, e.imgs, "--option", "steps"],
                             lambda e: ["error: --option 'steps': expected KEY=VALUE"], 2),
    "rule_map_missing": (lambda e: ["explain", e.model, e.imgs, "-m", "lrp", "--rule-map", e.tmp / "nope.json"],
                         lambda e: [f"error: --rule-map {e.tmp / 'nope.json'}: no such file"], 2),
    "out_is_a_file": (lambda e: ["explain", e.model, e.imgs, "--out", e.file("taken", b"x")],
                      lambda e: [f"error: --out {e.tmp / 'taken'}: exists and is not a folder"], 2),
    "missing_image": (lambda e: ["explain", e.model, e.tmp / "nope.png"],
                      lambda e: [f"error: {e.tmp / 'nope.png'}: no such image file or folder"], 2),
    "folder_without_images": (lambda e: ["explain", e.model, (e.tmp / "void").mkdir() or e.tmp / "void"],
                              lambda e: [f"error: {e.tmp / 'void'}: folder contains no images (.bmp, .gif, .jpeg, "
                                         ".jpg, .pam, .pbm, .pgm, .png, .pnm, .ppm, .tif, .tiff, .webp)"], 2),
    "duplicate_stems": (lambda e: ["explain", e.model, e.img, e.file("x/good0.jpg", e.img.read_bytes())],
                        lambda e: ["error: several images share the name 'good0'; outputs are written per image stem"],
                        2),
    "unknown_preset": (lambda e: ["explain", e.model, e.imgs, "--preset", "bogus"],
                       lambda e: ["error: unknown preset 'bogus'; known presets: torchvision, caffe, tf, "
                                  "efficientnet-lite, raw"], 2),
    "crop_larger_than_resize": (lambda e: ["explain", e.model, e.imgs, "--resize", "16", "--crop", "300"],
                                lambda e: ["error: crop (300) is larger than resize (16) with resize_mode shorter"], 2),
    "labels_missing": (lambda e: ["explain", e.model, e.imgs, "--labels", e.tmp / "labels.txt"],
                       lambda e: [f"error: --labels {e.tmp / 'labels.txt'}: no such file"],
                       2),
    # annotation files (read by `evaluate` before any work)
    "annotations_not_json": (lambda e: ["evaluate", e.model, e.imgs, "--annotations", _bad_annotations(e, "{boxes")],
                             lambda e: [f"error: --annotations {e.tmp / 'ann.json'}: invalid JSON (Expecting property "
                                        "name enclosed in double quotes at line 1)"], 2),
    "annotations_no_images_key": (lambda e: ["evaluate", e.model, e.imgs, "--annotations",
                                             _bad_annotations(e, '{"boxes": []}')],
                                  lambda e: [f"error: {e.tmp / 'ann.json'}: expected an object with key 'images' "
                                             "mapping file names to annotations"], 2),
    "annotations_inverted_box": (lambda e: ["evaluate", e.model, e.imgs, "--annotations", _bad_annotations(
        e, '{"images": {"good0.png": {"boxes_in_file": [[10, 5, 2, 8]]}}}')],
        lambda e: [f"error: {e.tmp / 'ann.json'}: images['good0.png'].boxes_in_file[0]: expected [x0, y0, x1, y1] "
                   "with x0 < x1 and y0 < y1, got [10, 5, 2, 8]"], 2),
    "annotations_nan_box": (lambda e: ["evaluate", e.model, e.imgs, "--annotations", _bad_annotations(
        e, '{"images": {"good0.png": {"objects": [{"box": [0, 0, NaN, 3]}]}}}')],
        lambda e: [f"error: {e.tmp / 'ann.json'}: images['good0.png'].objects[0].box: expected [x0, y0, x1, y1] "
                   "with x0 < x1 and y0 < y1, got [0, 0, nan, 3]"], 2),
    "annotations_negative_class": (lambda e: ["evaluate", e.model, e.imgs, "--annotations", _bad_annotations(
        e, '{"images": {"good0.png": {"class_index": -4, "boxes_in_file": [[0, 0, 2, 2]]}}}')],
        lambda e: [f"error: {e.tmp / 'ann.json'}: images['good0.png'].class_index: expected a class index "
                   "(non-negative integer), got -4"], 2),
}


def test_corpus_is_big_enough():
    assert len(CASES) >= 25
    kinds = {name.split("_")[0] for name in CASES}
    assert {"model", "external", "image", "annotations"} <= kinds


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(env, name):
    args_of, lines_of, code = CASES[name]
    if name.startswith("annotations") and "evaluate" not in main.commands:
        pytest.skip("the evaluate command (annotation files) is not registered in this build")
    args = [str(a) for a in args_of(env)]
    args += [] if "--out" in args else ["--out", str(env.out)]
    with opened_files(env.tmp) as seen:
        result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    stderr = result.stderr.splitlines()
    assert stderr == lines_of(env)
    assert result.stdout in ("", f"wrote 0 image(s) x 1 method(s) to {env.out}\n"), result.stdout
    assert not env.out.exists()
    assert "outside.bin" not in seen  # the file external-data cases point at is never opened
