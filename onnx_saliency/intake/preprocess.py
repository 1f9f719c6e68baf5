"""Image loading and model-input preparation.

Normalisation presets
---------------------
A :class:`Preset` maps a pixel ``p`` (0..255) of channel ``c`` to ``(p * scale - mean[c]) / std[c]`` after
the image has been put in the preset's channel order; ``mean``/``std`` are given in that order.

- ``torchvision``        RGB  ``p/255``, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
- ``caffe``              BGR  ``p - (104, 117, 123)``
- ``tf``                 RGB  ``p/127.5 - 1`` (range [-1, 1])
- ``efficientnet-lite``  RGB  ``(p - 127) / 128``
- ``raw``                RGB  ``p`` as float 0..255

Model metadata
--------------
An ONNX model may describe its own preprocessing in ``metadata_props`` (all values are strings):

``onnx_saliency.preset``       one of :data:`PRESETS`
``onnx_saliency.resize``       positive integer, or ``none``
``onnx_saliency.crop``         positive integer, or ``none``
``onnx_saliency.resize_mode``  ``shorter`` | ``square`` | ``none``
``onnx_saliency.labels``       JSON list of class names, index = class id

Image decoding
--------------
:func:`load_image` decodes with ``cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR``: unlike
``IMREAD_UNCHANGED`` this applies the EXIF orientation (OpenCV only skips it for ``IMREAD_UNCHANGED``),
keeps 16-bit samples (we scale them to 8 bits ourselves, ``/257``) and drops any alpha channel. Alpha is
dropped, not composited: transparent pixels keep whatever colour they store. Conversions, all to 8-bit RGB:

- grey, grey + alpha, 1-bit       grey value copied to R, G and B
- palette                         expanded by the decoder
- CMYK / inverted (Adobe) CMYK    converted to RGB by the decoder (JPEG, TIFF)
- 16-bit                          rounded ``/257``
- float (TIFF)                    taken as [0, 1], clipped, NaN -> 0, times 255
- animated GIF, multi-page TIFF   first frame / page only
- signed or 32-bit integer        refused

Accepted formats are :data:`SUPPORTED_FORMATS`, recognised by content, not by file name; OpenCV decodes
more (JPEG 2000, Radiance HDR, PFM...) but we refuse them, because for each accepted format we read the
width and height from the header and refuse more than ``max_pixels`` pixels (default :data:`MAX_PIXELS`,
CLI ``--max-pixels``) before decoding: a decompression bomb never reaches the decoder. Files larger than
``32 * max_pixels`` bytes (+64 MiB) are refused before being read.

Geometry follows torchvision's ``Resize(int)`` (long side truncated) and ``CenterCrop`` (offsets rounded half
to even) arithmetic; the resampling itself is ``cv2.INTER_LINEAR`` (no antialiasing, unlike PIL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import cv2
import numpy as np

from ..errors import SaliencyError
from ..guard import note_input

__all__ = [
    "Preset", "PRESETS", "Preprocessing", "MAX_PIXELS", "META_PRESET", "META_RESIZE", "META_CROP",
    "META_RESIZE_MODE", "META_LABELS", "METADATA_KEYS", "RESIZE_MODES", "LAYOUTS", "labels_from_metadata",
    "load_image", "decode_image", "prepare", "input_bounds", "SUPPORTED_FORMATS",
]

META_PRESET = "onnx_saliency.preset"
META_RESIZE = "onnx_saliency.resize"
META_CROP = "onnx_saliency.crop"
META_RESIZE_MODE = "onnx_saliency.resize_mode"
META_LABELS = "onnx_saliency.labels"
METADATA_KEYS = (META_PRESET, META_RESIZE, META_CROP, META_RESIZE_MODE, META_LABELS)

RESIZE_MODES = ("shorter", "square", "none")
LAYOUTS = ("NCHW", "NHWC")
MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Preset:
    """Per-channel affine normalisation ``(pixel * scale - mean) / std`` in ``channel_order``."""

    name: str
    channel_order: str  # "RGB" | "BGR"
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise SaliencyError(f"preset {self.name}: channel_order must be RGB or BGR, not {self.channel_order!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise SaliencyError(f"preset {self.name}: mean and std need 3 values each, std non-zero")

    def lut(self) -> np.ndarray:
        """(256, 3) float32 table: normalised value of every pixel value, per channel in model order.

        Computed in float64 and rounded once, so ``prepare`` and ``input_bounds`` agree exactly and are
        as close to the true value as float32 allows.
        """
        p = np.arange(256, dtype=np.float64)[:, None]
        return ((p * self.scale - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("torchvision", "RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        Preset("caffe", "BGR", 1.0, (104.0, 117.0, 123.0), (1.0, 1.0, 1.0)),
        Preset("tf", "RGB", 1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
        Preset("efficientnet-lite", "RGB", 1.0, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
        Preset("raw", "RGB", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    )
}


def _positive_int_or_none(value, what: str) -> int | None:
    if value is None:
        return None
    # bool is an int subclass; resize=True is surely a mistake.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise SaliencyError(f"{what} must be a positive integer or None, not {value!r}")
    return int(value)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: resize, centre crop, normalise, lay out."""

    preset: str = "torchvision"
    resize: int | None = 256
    crop: int | None = 224
    resize_mode: str = "shorter"
    layout: str = "NCHW"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise SaliencyError(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        object.__setattr__(self, "resize", _positive_int_or_none(self.resize, "resize"))
        object.__setattr__(self, "crop", _positive_int_or_none(self.crop, "crop"))
        mode = str(self.resize_mode).lower()
        if mode not in RESIZE_MODES:
            raise SaliencyError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}")
        object.__setattr__(self, "resize_mode", mode)
        layout = str(self.layout).upper()
        if layout not in LAYOUTS:
            raise SaliencyError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        object.__setattr__(self, "layout", layout)
        # Checked up front so a bad combination fails before any image is read.
        if mode != "none" and self.resize and self.crop and self.crop > self.resize:
            raise SaliencyError(f"crop ({self.crop}) is larger than resize ({self.resize}) with resize_mode {mode}")

    @property
    def spec(self) -> Preset:
        return PRESETS[self.preset]

    def with_overrides(self, **kw) -> "Preprocessing":
        """Copy with every non-None keyword applied (None means "not given", e.g. an unset CLI option)."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kw) - fields)
        if unknown:
            raise SaliencyError(f"unknown preprocessing option {unknown[0]!r}; known: {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def from_metadata(cls, props: Mapping[str, str] | None, layout: str = "NCHW",
                      input_hw: tuple | None = None) -> "Preprocessing":
        """Preprocessing from a model's ``metadata_props``, falling back to defaults.

        Without ``onnx_saliency.crop``, a static square model input of size S gives ``crop=S`` and
        ``resize=round(S*256/224)`` (the usual ImageNet ratio).
        """
        props = props or {}
        kw: dict = {"layout": layout}
        if META_PRESET in props:
            kw["preset"] = props[META_PRESET].strip()
            if kw["preset"] not in PRESETS:
                raise SaliencyError(f"metadata {META_PRESET}={props[META_PRESET]!r} is not a known preset "
                                    f"({', '.join(PRESETS)})")
        if META_RESIZE_MODE in props:
            kw["resize_mode"] = props[META_RESIZE_MODE].strip().lower()
            if kw["resize_mode"] not in RESIZE_MODES:
                raise SaliencyError(f"metadata {META_RESIZE_MODE}={props[META_RESIZE_MODE]!r} must be one of "
                                    f"{', '.join(RESIZE_MODES)}")
        for key, field in ((META_RESIZE, "resize"), (META_CROP, "crop")):
            if key in props:
                kw[field] = _parse_size(props[key], key)

        static = _static_square(input_hw)
        if META_CROP not in props and static:
            kw["crop"] = static
        if META_RESIZE not in props and isinstance(kw.get("crop"), int):
            kw["resize"] = round(kw["crop"] * 256 / 224)
        if static and isinstance(kw.get("crop"), int) and kw["crop"] != static:
            raise SaliencyError(f"metadata {META_CROP}={kw['crop']} does not match the model input size "
                                f"{static}x{static}")
        try:
            return cls(**kw)
        except SaliencyError as err:
            keys = ", ".join(k for k in METADATA_KEYS if k in props) or "no onnx_saliency keys"
            raise SaliencyError(f"model metadata ({keys}): {err}") from None


def _parse_size(text: str, key: str) -> int | None:
    t = str(text).strip().lower()
    if t in ("none", ""):
        return None
    try:
        v = int(t)
    except ValueError:
        v = 0
    if v <= 0:
        raise SaliencyError(f"metadata {key}={text!r} must be a positive integer or 'none'")
    return v


def _static_square(input_hw) -> int | None:
    """Side of a static input size, None when unknown/dynamic; error when static but not square."""
    if input_hw is None or len(input_hw) != 2:
        return None
    h, w = input_hw
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        return None  # symbolic or -1 dims: the model accepts what we give it
    if h != w:
        raise SaliencyError(f"model input is {h}x{w}; only square inputs are supported (crop is square)")
    return int(h)


def labels_from_metadata(props: Mapping[str, str] | None) -> list[str] | None:
    """Class names from ``onnx_saliency.labels``, or None when the key is absent."""
    if not props or META_LABELS not in props:
        return None
    try:
        labels = json.loads(props[META_LABELS])
    except (TypeError, ValueError):
        labels = None
    if not isinstance(labels, list) or not labels or not all(isinstance(s, str) for s in labels):
        raise SaliencyError(f"metadata {META_LABELS} must be a non-empty JSON list of strings")
    return labels


# ---------------------------------------------------------------------------------------------------------
# Loading


# Formats whose header we read before decoding, so every accepted file is size-checked before OpenCV
# allocates anything. OpenCV decodes more (JPEG 2000, HDR, PFM, Sun raster...); those are refused.
SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WebP", "TIFF", "PNM")


def _image_format(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PNM"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers carry no length
            i += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC): precision(1), height(2), width(2).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + max(length, 2)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first IFD, the page OpenCV decodes."""
    end = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte offsets and counts
    offset_fmt, count_fmt, entry = ("Q", "Q", 20) if big else ("I", "H", 12)
    try:
        (ifd,) = struct.unpack_from(end + offset_fmt, data, 8 if big else 4)
        (count,) = struct.unpack_from(end + count_fmt, data, ifd)
        first = ifd + struct.calcsize(count_fmt)
        dims = {}
        for k in range(min(count, 4096)):
            tag, kind = struct.unpack_from(end + "HH", data, first + k * entry)
            value_at = first + k * entry + (12 if big else 8)
            if tag in (256, 257):
                fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
                if fmt is None:
                    return None
                dims[tag] = struct.unpack_from(end + fmt, data, value_at)[0]
        return (dims[256], dims[257]) if len(dims) == 2 else None
    except struct.error:
        return None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    head = data[:4096]
    if head[1:2] == b"7":  # PAM: "WIDTH n" / "HEIGHT n" lines
        w, h = re.search(rb"\bWIDTH\s+(\d+)", head), re.search(rb"\bHEIGHT\s+(\d+)", head)
        return (int(w.group(1)), int(h.group(1))) if w and h else None
    tokens = re.sub(rb"#[^\n]*", b" ", head[2:]).split()
    if len(tokens) < 2 or not (tokens[0].isdigit() and tokens[1].isdigit()):
        return None
    return int(tokens[0]), int(tokens[1])


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header of a file in one of SUPPORTED_FORMATS, None if the header is broken."""
    if fmt == "PNG":
        return struct.unpack(">II", data[16:24]) if data[12:16] == b"IHDR" and len(data) >= 24 else None
    if fmt == "JPEG":
        return _jpeg_size(data)
    if fmt == "BMP":
        if len(data) < 26:
            return None
        if struct.unpack_from("<I", data, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            return struct.unpack_from("<HH", data, 18)
        w, h = struct.unpack_from("<ii", data, 18)
        return abs(w), abs(h)  # negative height: rows stored top-down
    if fmt == "GIF":
        return struct.unpack_from("<HH", data, 6) if len(data) >= 10 else None
    if fmt == "WebP":
        return _webp_size(data)
    if fmt == "TIFF":
        return _tiff_size(data)
    return _pnm_size(data)


@contextlib.contextmanager
def _decoder_messages_silenced():
    """libpng, libjpeg and OpenCV print their own complaints on file descriptor 2; our one-line error
    replaces them, so they go to /dev/null while decoding (output of other threads in that window too)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_image(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as uint8 H x W x 3 RGB (EXIF orientation applied, alpha dropped).

    Refused with a :class:`SaliencyError` naming the file: missing, empty, unknown format, a header
    claiming more than `max_pixels` pixels (checked before decoding), truncated or corrupt data, and
    sample types other than 8/16-bit unsigned or float.
    """
    if max_pixels < 1:
        raise SaliencyError(f"--max-pixels {max_pixels}: must be at least 1")
    note_input(path)  # never written over by this run's outputs
    try:
        size = os.stat(os.fspath(path)).st_size
        # 32 bytes per pixel covers uncompressed float64 RGBA; anything bigger is not an image we accept
        if size > 32 * max_pixels + (64 << 20):
            raise SaliencyError(f"{path}: file of {size} bytes is too large for an image within the limit of "
                                f"{max_pixels} pixels")
        data = np.fromfile(os.fspath(path), dtype=np.uint8)
    except FileNotFoundError:
        raise SaliencyError(f"{path}: no such file") from None
    except OSError as err:
        raise SaliencyError(f"{path}: cannot read ({err.strerror or err})") from None
    return decode_image(data, path, max_pixels)


def decode_image(data, path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """:func:`load_image` for an encoded image already in memory (bytes or a uint8 array read from a URI or
    a dataset column); `path` only names it in messages."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    if data.size > 32 * max_pixels + (64 << 20):
        raise SaliencyError(f"{path}: file of {data.size} bytes is too large for an image within the limit of "
                            f"{max_pixels} pixels")
    if data.size == 0:
        raise SaliencyError(f"{path}: not a readable image (empty file)")
    raw = data.tobytes()
    fmt = _image_format(raw[:16])
    if fmt is None:
        raise SaliencyError(f"{path}: not a readable image (unknown format; supported: "
                            f"{', '.join(SUPPORTED_FORMATS)})")
    wh = _header_size(raw, fmt)
    if wh is None or min(wh) <= 0:
        raise SaliencyError(f"{path}: not a readable image (corrupt {fmt} header)")
    if wh[0] * wh[1] > max_pixels:
        raise SaliencyError(f"{path}: image has {wh[0] * wh[1]} pixels, more than the limit of {max_pixels}")
    if fmt == "JPEG" and raw.rfind(b"\xff\xd9") < raw.find(b"\xff\xda"):
        # no end-of-image marker after the scan: libjpeg would fill the missing rows with grey and say so
        raise SaliencyError(f"{path}: not a readable image (JPEG data truncated: no end-of-image marker)")
    with _decoder_messages_silenced():
        try:
            img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        except cv2.error:
            img = None
    if img is None or img.size == 0:
        raise SaliencyError(f"{path}: not a readable image ({fmt} data truncated or corrupt)")
    if img.shape[0] * img.shape[1] > max_pixels:  # a header that understated the size
        raise SaliencyError(f"{path}: image has {img.shape[0] * img.shape[1]} pixels, "
                            f"more than the limit of {max_pixels}")
    return _to_rgb8(img, path)


def _to_rgb8(img: np.ndarray, path) -> np.ndarray:
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)  # rounded 65535 -> 255
    elif img.dtype.kind == "f":  # float TIFF: assume [0, 1]
        img = (np.clip(np.nan_to_num(img), 0, 1) * 255 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise SaliencyError(f"{path}: unsupported sample type {img.dtype} (need 8/16-bit unsigned or float)")
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels in (1, 2):  # grey, grey + alpha
        return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
    if channels in (3, 4):
        return np.ascontiguousarray(img[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped
    raise SaliencyError(f"{path}: unsupported image with {channels} channels")


# ---------------------------------------------------------------------------------------------------------
# Geometry and normalisation


def _resize_crop(img: np.ndarray, pre: Preprocessing, index: int) -> np.ndarray:
    h, w = img.shape[:2]
    if pre.resize and pre.resize_mode == "shorter":
        # torchvision.transforms.Resize(int) arithmetic (long side truncated), for parity.
        if w <= h:
            size = (pre.resize, int(pre.resize * h / w))  # (w, h) for cv2
        else:
            size = (int(pre.resize * w / h), pre.resize)
    elif pre.resize and pre.resize_mode == "square":
        size = (pre.resize, pre.resize)
    else:
        size = (w, h)
    if size[0] * size[1] > MAX_PIXELS:  # a 1 x 10^6 strip would become 16 x 1.6*10^7 at resize 16
        raise SaliencyError(f"image {index} is {h}x{w}; resizing it to {size[1]}x{size[0]} would exceed "
                            f"{MAX_PIXELS} pixels (aspect ratio too extreme)")
    if size != (w, h):
        img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    if pre.crop is None:
        return img
    h, w = img.shape[:2]
    if h < pre.crop or w < pre.crop:
        raise SaliencyError(f"image {index} is {h}x{w} after resizing, smaller than crop {pre.crop} "
                            f"(resize_mode {pre.resize_mode})")
    # torchvision.transforms.CenterCrop offsets (Python round: half to even).
    top = int(round((h - pre.crop) / 2.0))
    left = int(round((w - pre.crop) / 2.0))
    return img[top:top + pre.crop, left:left + pre.crop]


def prepare(images: Sequence[np.ndarray], pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Resize/crop/normalise RGB uint8 images into ``(batch float32 in pre.layout, display uint8 NHWC RGB)``."""
    if len(images) == 0:
        raise SaliencyError("no images to prepare")
    crops = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise SaliencyError(f"image {i}: expected uint8 HxWx3 RGB, got {img.dtype} {img.shape}")
        crops.append(_resize_crop(img, pre, i))
    if len({c.shape for c in crops}) > 1:
        sizes = ", ".join(sorted({f"{c.shape[0]}x{c.shape[1]}" for c in crops}))
        raise SaliencyError(f"images have different sizes after resizing ({sizes}); set a crop")
    display = np.stack(crops)
    spec = pre.spec
    pixels = display[..., ::-1] if spec.channel_order == "BGR" else display
    # One table lookup per value: broadcasting (N,H,W,3) pixel indices against (3,) channel indices.
    batch = spec.lut()[pixels, np.arange(3)]
    if pre.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32), display


def input_bounds(pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Normalised values of pixel 0 and pixel 255, per channel in model channel order (for LRP z^B)."""
    lut = pre.spec.lut()
    return lut[0].copy(), lut[255].copy()
