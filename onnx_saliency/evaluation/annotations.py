"""Ground-truth boxes and masks per image, and their mapping into model-input coordinates.

File format (JSON; keys starting with ``_`` are comments)::

    {
      "images": {
        "<image file name>": {
          "file_size_wh": [W, H],            optional; checked against the image file when given
          "class_index": 259,                optional; the class of every box of this image
          "boxes_in_file": [[x0, y0, x1, y1], ...],   boxes of `class_index`, in file pixels
          "objects": [                       and/or one entry per object:
            {"label": "dog",                 optional
             "class_index": 243,             optional; or "imagenet_classes": [243, 242]
             "box": [x0, y0, x1, y1],        a box, or
             "mask": "masks/dog.png"}        a mask image (non-zero = object; path relative to this file)
          ]
        }
      }
    }

Boxes are ``[x0, y0, x1, y1]`` in file pixels with pixel edges as coordinates: the box ``[0, 0, 2, 2]``
covers pixels 0 and 1 in each direction (x1, y1 exclusive for integer boxes). A file that only has
``boxes_original`` with ``original_size_wh`` (the imagenet_val file in ../shared does) is scaled to the file
size. The two annotation files in ../shared/images and the embedded samples' ``annotations.json`` are
all read as they are.

An image's boxes are mapped through the same resize and centre crop as the pixels
(:func:`onnx_saliency.intake.preprocess.prepare`), so metrics compare maps and boxes in input coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import SaliencyError
from ..intake.preprocess import Preprocessing, load_image
from ..intake.side_files import read_json

__all__ = ["AnnotatedObject", "ImageAnnotation", "InputRegions", "load_annotations", "resize_crop_geometry",
           "map_boxes"]


@dataclass(frozen=True)
class AnnotatedObject:
    box: tuple[float, float, float, float] | None    # file pixels
    classes: tuple[int, ...] = ()                     # empty: class unknown
    label: str | None = None
    mask_path: Path | None = None


@dataclass
class ImageAnnotation:
    name: str
    objects: list[AnnotatedObject]
    file_size_wh: tuple[int, int] | None = None
    source: Path | None = None

    def check_inside(self, image_hw: tuple[int, int]) -> None:
        """Refuse a box that lies wholly outside the image file (it would be scored as a miss, silently);
        boxes partly outside are clipped, as datasets' boxes often are by a pixel."""
        h, w = image_hw
        for k, o in enumerate(self.objects):
            if o.box is not None:
                x0, y0, x1, y1 = o.box
                if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                    raise SaliencyError(f"{self.source}: images[{self.name!r}]: box {k} {list(o.box)} lies outside "
                                        f"the {w}x{h} image")

    @property
    def classes(self) -> list[int]:
        return sorted({c for o in self.objects for c in o.classes})

    def regions(self, target: int, image_hw: tuple[int, int], pre: Preprocessing) -> "InputRegions":
        """Boxes and mask of the objects of class `target`, in input pixels; all objects when none has
        that class (or classes are not annotated), which `matched` records."""
        h, w = image_hw
        if self.file_size_wh is not None and tuple(self.file_size_wh) != (w, h):
            raise SaliencyError(f"{self.source}: images[{self.name!r}].file_size_wh is {list(self.file_size_wh)} "
                                f"but the image is {w}x{h}")
        chosen = [o for o in self.objects if target in o.classes]
        matched = bool(chosen)
        if not chosen:
            chosen = self.objects
        geometry = resize_crop_geometry(w, h, pre)
        boxes = [o.box for o in chosen if o.box is not None]
        mapped = map_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), geometry)
        mask = None
        masks = [o for o in chosen if o.mask_path is not None]
        if masks:
            mask = np.zeros(geometry.out_hw, bool)
            for o in masks:
                mask |= _mapped_mask(o.mask_path, (h, w), geometry, self)
            for b in mapped:  # objects given by box only still count in the union
                mask[_box_slices(b, geometry.out_hw)] = True
        return InputRegions(boxes=mapped, mask=mask, matched=matched, hw=geometry.out_hw)


@dataclass
class InputRegions:
    boxes: np.ndarray               # (K, 4) float64 [x0, y0, x1, y1] in input pixels, clipped; may be (0, 4)
    mask: np.ndarray | None         # (H, W) bool where masks were annotated
    matched: bool                   # False: no object had the target class, all objects were used
    hw: tuple[int, int]

    def union_mask(self) -> np.ndarray:
        """The pixels (centres) inside any box or the mask."""
        if self.mask is not None:
            return self.mask.copy()
        out = np.zeros(self.hw, bool)
        for b in self.boxes:
            out[_box_slices(b, self.hw)] = True
        return out


def _box_slices(box, hw) -> tuple[slice, slice]:
    """Pixels whose centre (i + 0.5) lies inside [lo, hi]."""
    x0, y0, x1, y1 = box
    return (slice(max(0, math.ceil(y0 - 0.5)), min(hw[0], math.floor(y1 - 0.5) + 1)),
            slice(max(0, math.ceil(x0 - 0.5)), min(hw[1], math.floor(x1 - 0.5) + 1)))


@dataclass(frozen=True)
class Geometry:
    """File (w, h) -> resized (rw, rh) -> crop window at (left, top) of size out_hw."""

    scale_xy: tuple[float, float]
    offset_xy: tuple[int, int]
    resized_wh: tuple[int, int]
    out_hw: tuple[int, int]


def resize_crop_geometry(w: int, h: int, pre: Preprocessing) -> Geometry:
    """The arithmetic of ``preprocess._resize_crop``, applied to sizes instead of pixels."""
    if pre.resize and pre.resize_mode == "shorter":
        size = (pre.resize, int(pre.resize * h / w)) if w <= h else (int(pre.resize * w / h), pre.resize)
    elif pre.resize and pre.resize_mode == "square":
        size = (pre.resize, pre.resize)
    else:
        size = (w, h)
    rw, rh = size
    if pre.crop is None:
        top = left = 0
        out_hw = (rh, rw)
    else:
        top = int(round((rh - pre.crop) / 2.0))
        left = int(round((rw - pre.crop) / 2.0))
        out_hw = (pre.crop, pre.crop)
    # cv2.resize maps pixel edges linearly (centre (i + 0.5) * scale), so edge coordinates scale exactly
    return Geometry((rw / w, rh / h), (left, top), (rw, rh), out_hw)


def map_boxes(boxes: np.ndarray, g: Geometry) -> np.ndarray:
    """File-pixel boxes -> input-pixel boxes, clipped to the crop; boxes left with no area are dropped."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sx, sy = g.scale_xy
    left, top = g.offset_xy
    out = boxes * [sx, sy, sx, sy] - [left, top, left, top]
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, g.out_hw[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, g.out_hw[0])
    return out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]


def _mapped_mask(path: Path, image_hw, g: Geometry, ann: ImageAnnotation) -> np.ndarray:
    try:
        mask = load_image(path)[..., 0] > 0
    except SaliencyError as err:
        raise SaliencyError(f"{ann.source}: images[{ann.name!r}] mask: {err}") from None
    if mask.shape != tuple(image_hw):
        raise SaliencyError(f"{ann.source}: images[{ann.name!r}] mask {path.name} is {mask.shape[1]}x{mask.shape[0]}, "
                            f"the image is {image_hw[1]}x{image_hw[0]}")
    resized = cv2.resize(mask.astype(np.float32), g.resized_wh, interpolation=cv2.INTER_LINEAR) >= 0.5
    top, left = g.offset_xy[1], g.offset_xy[0]
    return resized[top:top + g.out_hw[0], left:left + g.out_hw[1]]


# ---------------------------------------------------------------------------------------------------------
# Reading


def load_annotations(path) -> dict[str, ImageAnnotation]:
    """``{file name: ImageAnnotation}`` from an annotations JSON file (format in the module docstring)."""
    path = Path(path)
    data = read_json(path, "--annotations")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, dict):
        raise SaliencyError(f"{path}: expected an object with key 'images' mapping file names to annotations")
    return {name: _parse_image(path, name, entry) for name, entry in images.items()}


def _parse_image(path: Path, name: str, entry) -> ImageAnnotation:
    where = f"{path}: images[{name!r}]"
    if not isinstance(entry, dict):
        raise SaliencyError(f"{where}: expected an object")
    size = _size(entry, "file_size_wh", where)
    image_classes = _classes(entry, where)
    objects: list[AnnotatedObject] = []
    if "boxes_in_file" in entry:
        boxes = _box_list(entry["boxes_in_file"], f"{where}.boxes_in_file")
    elif "boxes_original" in entry:
        boxes = _box_list(entry["boxes_original"], f"{where}.boxes_original")
        original = _size(entry, "original_size_wh", where)
        if original is None or size is None:
            raise SaliencyError(f"{where}.boxes_original: needs original_size_wh and file_size_wh to scale the boxes")
        fx, fy = size[0] / original[0], size[1] / original[1]
        boxes = [(b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy) for b in boxes]
    else:
        boxes = []
    objects += [AnnotatedObject(b, image_classes) for b in boxes]
    raw_objects = entry.get("objects", [])
    if not isinstance(raw_objects, list):
        raise SaliencyError(f"{where}.objects: expected a list")
    for k, obj in enumerate(raw_objects):
        objects.append(_parse_object(path, obj, f"{where}.objects[{k}]", image_classes))
    if not objects:
        raise SaliencyError(f"{where}: no boxes or masks (expected boxes_in_file or objects)")
    return ImageAnnotation(name, objects, size, path)


def _parse_object(path: Path, obj, where: str, image_classes) -> AnnotatedObject:
    if not isinstance(obj, dict):
        raise SaliencyError(f"{where}: expected an object")
    box = _box(obj["box"], f"{where}.box") if "box" in obj else None
    mask = None
    if "mask" in obj:
        if not isinstance(obj["mask"], str) or not obj["mask"]:
            raise SaliencyError(f"{where}.mask: expected a file name relative to the annotations file")
        mask = path.parent / obj["mask"]
        # masks come from the annotations' own folder: no absolute paths, '..' or symlinks leading out of it
        root = path.parent.resolve()
        if Path(obj["mask"]).is_absolute() or not mask.resolve().is_relative_to(root):
            raise SaliencyError(f"{where}.mask: {obj['mask']!r} points outside the annotations folder; refusing to read it")
        if not mask.is_file():
            raise SaliencyError(f"{where}.mask: no such file {mask}")
    if box is None and mask is None:
        raise SaliencyError(f"{where}: needs a 'box' or a 'mask'")
    label = obj.get("label")
    return AnnotatedObject(box, _classes(obj, where) or image_classes, None if label is None else str(label), mask)


def _classes(entry: dict, where: str) -> tuple[int, ...]:
    out: list[int] = []
    if "class_index" in entry:
        out.append(_int(entry["class_index"], f"{where}.class_index"))
    if "imagenet_classes" in entry:
        values = entry["imagenet_classes"]
        if not isinstance(values, list):
            raise SaliencyError(f"{where}.imagenet_classes: expected a list of class indices")
        out += [_int(v, f"{where}.imagenet_classes") for v in values]
    return tuple(out)


def _int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SaliencyError(f"{where}: expected a class index (non-negative integer), got {value!r}")
    return value


def _size(entry: dict, key: str, where: str) -> tuple[int, int] | None:
    if key not in entry:
        return None
    v = entry[key]
    if (not isinstance(v, list) or len(v) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)):
        raise SaliencyError(f"{where}.{key}: expected [width, height] as two positive integers, got {v!r}")
    return int(v[0]), int(v[1])


def _box_list(value, where: str) -> list[tuple]:
    if not isinstance(value, list):
        raise SaliencyError(f"{where}: expected a list of [x0, y0, x1, y1] boxes")
    return [_box(b, f"{where}[{k}]") for k, b in enumerate(value)]


def _box(value, where: str) -> tuple[float, float, float, float]:
    ok = (isinstance(value, list) and len(value) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok or not (value[0] < value[2] and value[1] < value[3]):
        raise SaliencyError(f"{where}: expected [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {value!r}")
    return tuple(float(v) for v in value)


def find(annotations: dict[str, ImageAnnotation], image: Path, source) -> ImageAnnotation:
    """The entry for an image file, by file name."""
    entry = annotations.get(Path(image).name)
    if entry is None:
        more = " ..." if len(annotations) > 5 else ""
        raise SaliencyError(f"{source}: no entry for image {Path(image).name!r} "
                            f"(annotated: {', '.join(sorted(annotations)[:5])}{more})")
    return entry
