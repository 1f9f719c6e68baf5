"""Annotation files: the accepted formats, clear errors, and boxes mapped exactly like the pixels."""

import json

import cv2
import numpy as np
import pytest

from onnx_saliency import SaliencyError
from onnx_saliency.evaluation.annotations import load_annotations, map_boxes, resize_crop_geometry
from onnx_saliency.models import DEFAULT_SAMPLES_DIR
from onnx_saliency.intake.preprocess import Preprocessing, _resize_crop


@pytest.mark.parametrize("wh,pre", [
    ((300, 200), Preprocessing(resize=256, crop=224)),               # landscape, shorter side
    ((150, 333), Preprocessing(resize=64, crop=48)),                 # portrait, odd sizes
    ((224, 224), Preprocessing(resize=256, crop=224)),               # the imagenet_val files
    ((97, 61), Preprocessing(resize=80, crop=40, resize_mode="square")),
    ((90, 70), Preprocessing(resize=None, crop=50, resize_mode="none")),
    ((120, 90), Preprocessing(resize=100, crop=None)),
])
def test_mapped_boxes_follow_the_resized_and_cropped_pixels(wh, pre):
    w, h = wh
    rng = np.random.default_rng(w * h)
    for _ in range(3):
        x0, x1 = sorted(rng.choice(np.arange(w // 5, w - w // 5), 2, replace=False))
        y0, y1 = sorted(rng.choice(np.arange(h // 5, h - h // 5), 2, replace=False))
        img = np.zeros((h, w, 3), np.uint8)
        img[y0:y1, x0:x1] = 255
        out = _resize_crop(img, pre, 0)[..., 0].astype(float)
        mapped = map_boxes([[x0, y0, x1, y1]], resize_crop_geometry(w, h, pre))
        geometry = resize_crop_geometry(w, h, pre)
        assert out.shape == geometry.out_hw
        if not len(mapped):
            assert (out < 128).all()  # the box fell outside the crop
            continue
        # the box's edges in the output: where the interpolated intensity crosses half
        cols = out.max(axis=0) / 255
        rows = out.max(axis=1) / 255
        edges = [_crossing(cols, True), _crossing(rows, True), _crossing(cols, False), _crossing(rows, False)]
        assert np.allclose(mapped[0], edges, atol=0.75), (mapped[0], edges)


def _crossing(profile, rising):
    """Sub-pixel edge position (pixel edges as coordinates) where a 0..1 profile crosses 0.5."""
    inside = profile >= 0.5
    if rising:
        k = int(np.argmax(inside))
        if k == 0:
            return 0.0
        return k - 0.5 + (0.5 - profile[k - 1]) / (profile[k] - profile[k - 1])
    k = len(profile) - 1 - int(np.argmax(inside[::-1]))
    if k == len(profile) - 1:
        return float(len(profile))
    return k + 0.5 + (profile[k] - 0.5) / (profile[k] - profile[k + 1])


def test_embedded_samples_map_into_the_default_models_input():
    ann = load_annotations(DEFAULT_SAMPLES_DIR / "annotations.json")
    entry = ann["circle_0.png"]
    assert entry.classes == [0] and entry.file_size_wh == (96, 96)
    pre = Preprocessing(preset="tf", resize=64, crop=64)
    reg = entry.regions(0, (96, 96), pre)
    assert reg.matched and reg.hw == (64, 64)
    assert np.allclose(reg.boxes, [[27 * 2 / 3, 14 * 2 / 3, 81 * 2 / 3, 69 * 2 / 3]])
    multi = ann["circle_square_0.png"]
    square = multi.regions(1, (96, 128), pre)  # 128x96 -> 85x64, crop from x = 10 (round(10.5) = 10)
    assert len(multi.objects) == 2 and np.allclose(square.boxes, [[60 * 85 / 128 - 10, 25 * 2 / 3, 90 * 85 / 128 - 10,
                                                                   56 * 2 / 3]])
    unmatched = multi.regions(4, (96, 128), pre)  # no star here: every object counts, and that is recorded
    assert not unmatched.matched and len(unmatched.boxes) == 2
    with pytest.raises(SaliencyError, match=r"\['circle_0.png'\].file_size_wh is \[96, 96\] but the image is 80x96"):
        entry.regions(0, (96, 80), pre)


@pytest.mark.shared
def test_reads_both_shared_annotation_files(shared):
    val = load_annotations(shared / "images" / "imagenet_val" / "annotations.json")
    assert len(val) == 10
    pom = val["ILSVRC2012_val_00000057.JPEG"]
    assert pom.classes == [259]
    assert [o.box for o in pom.objects] == [(27.8, 81.8, 130.4, 215.6), (61.8, 30.5, 196.2, 195.9)]
    reg = pom.regions(259, (224, 224), Preprocessing(resize=256, crop=224))
    s = 256 / 224  # 224 -> 256, then a 16-pixel centre crop offset
    assert np.allclose(reg.boxes[0], [27.8 * s - 16, 81.8 * s - 16, 130.4 * s - 16, 224])  # clipped to the crop
    classic = load_annotations(shared / "images" / "classic" / "annotations.json")["cat_dog.png"]
    assert [o.label for o in classic.objects] == ["dog", "cat"]
    assert classic.objects[1].classes == (281, 282, 285)
    dog = classic.regions(243, (224, 224), Preprocessing(resize=224, crop=224))
    assert dog.matched and np.allclose(dog.boxes, [[78, 12, 163, 150]])


def test_boxes_original_are_scaled_to_the_file_and_masks_are_mapped(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:50] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    (tmp_path / "a.json").write_text(json.dumps({"_about": "test", "images": {
        "a.jpg": {"class_index": 3, "original_size_wh": [120, 80], "file_size_wh": [60, 40],
                  "boxes_original": [[20, 10, 60, 50]]},
        "b.png": {"objects": [{"mask": "m.png", "class_index": 1}]}}}))
    ann = load_annotations(tmp_path / "a.json")
    assert ann["a.jpg"].objects[0].box == (10, 5, 30, 25) and ann["a.jpg"].classes == [3]
    reg = ann["b.png"].regions(1, (40, 60), Preprocessing(resize=20, crop=20))  # 60x40 -> 30x20, crop x 5..25
    expected = np.zeros((20, 20), bool)
    expected[5:10, 10:20] = True
    assert reg.mask is not None and np.array_equal(reg.mask, expected)


@pytest.mark.parametrize("content,message", [
    ("{not json", "invalid JSON"),
    ('{"pictures": {}}', "expected an object with key 'images'"),
    ('{"images": {"x.png": {"objects": [{"box": [0, 0, 5]}]}}}', r"images\['x.png'\].objects\[0\].box: expected \[x0"),
    ('{"images": {"x.png": {"boxes_in_file": [[3, 0, 1, 4]]}}}', r"images\['x.png'\].boxes_in_file\[0\]"),
    ('{"images": {"x.png": {"objects": [{"box": [0, 0, 5, 5], "class_index": -2}]}}}', r"objects\[0\].class_index"),
    ('{"images": {"x.png": {"objects": [{"label": "cat"}]}}}', r"objects\[0\]: needs a 'box' or a 'mask'"),
    ('{"images": {"x.png": {"objects": [{"mask": "none.png"}]}}}', r"objects\[0\].mask: no such file"),
    ('{"images": {"x.png": {"file_size_wh": [0, 3], "boxes_in_file": [[0, 0, 1, 1]]}}}', r"file_size_wh: expected"),
    ('{"images": {"x.png": {"boxes_original": [[0, 0, 1, 1]]}}}', "needs original_size_wh and file_size_wh"),
    ('{"images": {"x.png": {}}}', "no boxes or masks"),
])
def test_malformed_files_name_the_file_and_key(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(SaliencyError, match=message) as err:
        load_annotations(path)
    assert str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(SaliencyError, match="--annotations /nonexistent.json: no such file"):
        load_annotations("/nonexistent.json")


@pytest.mark.parametrize("where", ["../outside.png", "/etc/hostname", "link.png"])
def test_mask_paths_may_not_leave_the_annotations_folder(tmp_path, where):
    folder = tmp_path / "ann"
    folder.mkdir()
    outside = tmp_path / "outside.png"
    cv2.imwrite(str(outside), np.full((4, 4), 255, np.uint8))
    (folder / "link.png").symlink_to(outside)
    path = folder / "a.json"
    path.write_text(json.dumps({"images": {"x.png": {"objects": [{"mask": where}]}}}))
    with pytest.raises(SaliencyError, match=r"objects\[0\].mask: .* points outside the annotations folder"):
        load_annotations(path)
