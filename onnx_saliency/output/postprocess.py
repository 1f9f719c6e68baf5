"""Turning raw saliency maps into pictures: normalise, resize, colour, overlay, tile.

Sizes are given as ``(H, W)`` throughout; the conversion to OpenCV's ``(W, H)`` happens here only.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from ..errors import SaliencyError

__all__ = ["minmax", "resize_maps", "scale_cam_image", "colorize", "colorize_signed", "overlay", "grid",
           "COLORMAPS"]

COLORMAPS = {
    "jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO, "magma": cv2.COLORMAP_MAGMA, "plasma": cv2.COLORMAP_PLASMA,
    "hot": cv2.COLORMAP_HOT, "bone": cv2.COLORMAP_BONE, "gray": None,
}


def minmax(maps: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Per-map min-max to [0, 1) over the last two axes, as pytorch-grad-cam: ``(m - min) / (eps + max)``.

    A constant map becomes all zeros rather than NaN (0 / eps).
    """
    maps = np.asarray(maps)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float32)
    shifted = maps - maps.min(axis=(-2, -1), keepdims=True)
    return shifted / (eps + shifted.max(axis=(-2, -1), keepdims=True))


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps to (N, H, W) float32; ``size`` is (H, W)."""
    maps = np.asarray(maps, dtype=np.float32)
    h, w = int(size[0]), int(size[1])
    if maps.shape[-2:] == (h, w):
        return maps.copy()
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps]).astype(np.float32)


def scale_cam_image(maps: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """pytorch-grad-cam 1.5.7 ``scale_cam_image`` for (N, h, w) maps, bit for bit: min-max, then resize.

    Differences in calling convention only: ``size`` is (H, W) here (theirs is cv2's (W, H)), and 3-D
    maps (their scipy ``zoom`` branch) are not supported. The per-image loop mirrors theirs on purpose, so
    the arithmetic (dtypes, order of operations) is identical.
    """
    out = []
    for img in maps:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        if size is not None:
            img = cv2.resize(np.float32(img), (int(size[1]), int(size[0])))  # cv2 default: INTER_LINEAR
        out.append(img)
    return np.float32(out)


def colorize(map01: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(H, W) map in [0, 1] -> uint8 RGB using an OpenCV colormap (values clipped, NaN as 0).

    Quantised as ``np.uint8(255 * m)`` (truncation) like pytorch-grad-cam's ``show_cam_on_image``.
    """
    if colormap not in COLORMAPS:
        raise SaliencyError(f"unknown colormap {colormap!r}; known: {', '.join(COLORMAPS)}")
    m = np.clip(np.nan_to_num(np.asarray(map01, dtype=np.float32)), 0.0, 1.0)
    gray = np.uint8(255 * m)
    if COLORMAPS[colormap] is None:
        return np.repeat(gray[:, :, None], 3, axis=2)
    return cv2.cvtColor(cv2.applyColorMap(gray, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)


def colorize_signed(signed_map: np.ndarray) -> np.ndarray:
    """(H, W) map of any sign -> uint8 RGB, blue (negative) / white (0) / red (positive), like matplotlib's
    "bwr", scaled by max |value| so that zero is always white."""
    m = np.nan_to_num(np.asarray(signed_map, dtype=np.float64))
    peak = np.abs(m).max() if m.size else 0.0
    v = m / peak if peak > 0 else np.zeros_like(m)
    # Linear blue -> white for v < 0, white -> red for v >= 0.
    fade = 1.0 - np.abs(v)
    r = np.where(v < 0, fade, 1.0)
    g = fade
    b = np.where(v < 0, 1.0, fade)
    return np.rint(np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def overlay(image_rgb: np.ndarray, heat_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map onto an image as pytorch-grad-cam's ``show_cam_on_image`` (``alpha`` =
    1 - image_weight): ``cam = alpha*heat + (1-alpha)*img`` in float [0, 1], then ``cam / max(cam)``."""
    if not 0.0 <= alpha <= 1.0:
        raise SaliencyError(f"overlay alpha must be in [0, 1], not {alpha}")
    if np.shape(image_rgb) != np.shape(heat_rgb):
        raise SaliencyError(f"overlay: image {np.shape(image_rgb)} and heat map {np.shape(heat_rgb)} differ in size")
    img = np.float32(image_rgb) / 255
    heat = np.float32(heat_rgb) / 255
    image_weight = 1 - alpha
    cam = (1 - image_weight) * heat + image_weight * img  # their expression, for bit-identical output
    peak = np.max(cam)
    if peak > 0:  # theirs divides unconditionally; an all-black blend would give NaN
        cam = cam / peak
    return np.uint8(255 * cam)


_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.5
_TITLE_H = 22
_PAD = 4


def _fit_title(title: str, width: int) -> str:
    # Hershey fonts are ASCII only; anything else would be drawn as '?'.
    text = title.encode("ascii", "replace").decode()
    while text and cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)[0][0] > width - 2 * _PAD:
        text = text[:-4] + "..." if len(text) > 3 else ""
    return text


def grid(images: Sequence[np.ndarray], titles: Sequence[str], cols: int | None = None) -> np.ndarray:
    """Tile uint8 RGB images (any sizes) on white, each under a title bar; ``cols`` defaults to ~sqrt(n)."""
    if not images:
        raise SaliencyError("grid: no images")
    if len(titles) != len(images):
        raise SaliencyError(f"grid: {len(images)} images but {len(titles)} titles")
    n = len(images)
    cols = max(1, min(n, cols or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    cell_h = max(im.shape[0] for im in images) + _TITLE_H
    cell_w = max(im.shape[1] for im in images)
    canvas = np.full((rows * cell_h + (rows - 1) * _PAD, cols * cell_w + (cols - 1) * _PAD, 3), 255, np.uint8)
    for i, (im, title) in enumerate(zip(images, titles)):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise SaliencyError(f"grid: image {i} ({title}) must be uint8 HxWx3, got {im.dtype} {im.shape}")
        y = (i // cols) * (cell_h + _PAD)
        x = (i % cols) * (cell_w + _PAD)
        cv2.putText(canvas, _fit_title(str(title), cell_w), (x + _PAD, y + _TITLE_H - 7), _FONT, _FONT_SCALE,
                    (0, 0, 0), 1, cv2.LINE_AA)
        canvas[y + _TITLE_H:y + _TITLE_H + im.shape[0], x:x + im.shape[1]] = im
    return canvas
