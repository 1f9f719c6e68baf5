"""Turning raw saliency maps into pictures: normalise, resize, colour, overlay, tile.

Sizes are given as ``(H, W)`` throughout; the conversion to OpenCV's ``(W, H)`` happens here only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from ..errors import SaliencyError

__all__ = ["minmax", "resize_maps", "scale_cam_image", "colorize", "colorize_signed", "diverging", "overlay",
           "grid", "COLORMAPS", "MAP_KINDS", "map_kind", "ColourScale", "render", "with_colour_bar", "titled",
           "upscale", "figure"]

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


def diverging(v: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] (clipped) -> uint8 RGB, linear blue (-1) / white (0) / red (+1), matplotlib's "bwr"."""
    v = np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64)), -1.0, 1.0)
    fade = 1.0 - np.abs(v)
    r = np.where(v < 0, fade, 1.0)
    g = fade
    b = np.where(v < 0, 1.0, fade)
    return np.rint(np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def colorize_signed(signed_map: np.ndarray) -> np.ndarray:
    """(H, W) map of any sign -> uint8 RGB, blue (negative) / white (0) / red (positive), like matplotlib's
    "bwr", scaled by max |value| so that zero is always white."""
    m = np.nan_to_num(np.asarray(signed_map, dtype=np.float64))
    peak = np.abs(m).max() if m.size else 0.0
    return diverging(m / peak if peak > 0 else np.zeros_like(m))


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


# --- Rendering by map kind -------------------------------------------------------------------------------
#
# What a map is decides how it is drawn:
#   cam     coarse, non-negative layer maps (Grad-CAM family, Relevance-CAM, +ge): min-max, jet, washed over
#           the photo as pytorch-grad-cam's show_cam_on_image.
#   signed  pixel maps with a sign (LRP, gradient x input, TSGB, IG): a heatmap of its own, symmetric diverging
#           (red +, blue -, white 0), clipped at a percentile of |R| as zennit/captum users expect; a faint
#           pixel-level map washed over a photo is invisible, so blending is opt-in, and then onto a grey copy.
#   pixel   unsigned pixel maps (gradient, SmoothGrad, guided backprop): sequential (inferno) from 0 to a
#           percentile of the map, clipped there, so a few extreme pixels do not leave the rest black.

MAP_KINDS = ("cam", "signed", "pixel")
DEFAULT_CLIP_PERCENTILE = 99.5


def map_kind(signed: bool, pixel: bool) -> str:
    """The drawing kind of a map: signed maps diverge; unsigned pixel maps are sequential; the rest are CAMs."""
    return "signed" if signed else ("pixel" if pixel else "cam")


@dataclass(frozen=True)
class ColourScale:
    """What a colour means: `ramp` (256, 3) uint8 from `lo` (index 0) to `hi` (index 255); `caption` says the
    convention (sign, clipping) in words."""

    ramp: np.ndarray
    lo: float
    hi: float
    caption: str

    def as_dict(self) -> dict:
        return {"lo": float(self.lo), "hi": float(self.hi), "caption": self.caption}


def _grey(display: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(np.asarray(display, np.uint8), cv2.COLOR_RGB2GRAY)
    return np.repeat(g[:, :, None], 3, axis=2)


def _blend_on_grey(heat: np.ndarray, strength: np.ndarray, display: np.ndarray) -> np.ndarray:
    """Colour where the map is strong, the grey photo where it is ~0: out = a*heat + (1-a)*grey, a = |v|."""
    if np.shape(display)[:2] != np.shape(heat)[:2]:
        raise SaliencyError(f"blend: image {np.shape(display)} and map {np.shape(heat)} differ in size")
    a = np.clip(strength, 0.0, 1.0)[:, :, None]
    return np.rint(a * heat + (1 - a) * _grey(display)).astype(np.uint8)


def _percentile_peak(values: np.ndarray, percentile: float) -> float:
    """The clip level: the `percentile` of `values` (>= 0), or their max when that percentile is 0."""
    if not 0.0 < percentile <= 100.0:
        raise SaliencyError(f"clip percentile must be in (0, 100], not {percentile}")
    if values.size == 0:
        return 0.0
    peak = float(np.percentile(values, percentile))
    return peak if peak > 0 else float(values.max())


def render(saliency: np.ndarray, kind: str, display: np.ndarray | None = None, *,
           clip_percentile: float = DEFAULT_CLIP_PERCENTILE, blend: bool = False,
           colormap: str = "jet") -> tuple[np.ndarray, ColourScale]:
    """An (H, W) map as uint8 RGB at its own size, drawn as its `kind` says, and the scale that reads it.

    `display` (uint8 RGB, same size) is the photo: CAMs are always overlaid on it; signed and pixel maps only
    with `blend` (onto its grey copy)."""
    if kind not in MAP_KINDS:
        raise SaliencyError(f"unknown map kind {kind!r}; known: {', '.join(MAP_KINDS)}")
    m = np.nan_to_num(np.asarray(saliency, dtype=np.float64))
    if m.ndim != 2:
        raise SaliencyError(f"render: a map must be 2-D (H, W), got shape {m.shape}")
    if kind == "cam":
        heat = colorize(minmax(m[None])[0], colormap)
        ramp = colorize(np.linspace(0, 1, 256)[None], colormap)[0]
        scale = ColourScale(ramp, float(m.min()) if m.size else 0.0, float(m.max()) if m.size else 0.0,
                            f"CAM ({colormap}): map min to max")
        return (heat if display is None else overlay(display, heat, alpha=0.5)), scale
    if kind == "signed":
        peak = _percentile_peak(np.abs(m), clip_percentile)
        v = m / peak if peak > 0 else np.zeros_like(m)
        heat = diverging(v)
        ramp = diverging(np.linspace(-1, 1, 256))
        scale = ColourScale(ramp, -peak, peak, f"red +, blue -, white 0; |R| clipped at p{clip_percentile:g}")
        strength = np.abs(np.clip(v, -1, 1))
    else:
        low = min(0.0, float(m.min())) if m.size else 0.0
        peak = _percentile_peak(m - low, clip_percentile)
        v = np.clip((m - low) / peak, 0, 1) if peak > 0 else np.zeros_like(m)
        heat = colorize(v.astype(np.float32), "inferno")
        ramp = colorize(np.linspace(0, 1, 256)[None], "inferno")[0]
        scale = ColourScale(ramp, low, low + peak, f"sequential from {'0' if low == 0 else 'min'}; "
                            f"clipped at p{clip_percentile:g}")
        strength = v
    if blend and display is not None:
        heat = _blend_on_grey(heat, strength, display)
        scale = ColourScale(scale.ramp, scale.lo, scale.hi, scale.caption + "; on grey")
    return heat, scale


_BAR_W = 14
_TICK_FONT = 0.4


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def upscale(rgb: np.ndarray, min_height: int) -> np.ndarray:
    """Nearest-neighbour upscaling by the smallest integer factor reaching `min_height` rows (pixels stay
    square and sharp: each map value is still one visible block)."""
    h = rgb.shape[0]
    k = max(1, math.ceil(min_height / max(h, 1)))
    if k == 1:
        return rgb
    return cv2.resize(rgb, (rgb.shape[1] * k, h * k), interpolation=cv2.INTER_NEAREST)


def with_colour_bar(panel: np.ndarray, scale: ColourScale) -> np.ndarray:
    """`panel` with a vertical colour bar to its right, `hi` at the top, labelled with numbers at both ends
    and the middle (0 on a symmetric scale)."""
    h = panel.shape[0]
    labels = [scale.hi, (scale.lo + scale.hi) / 2, scale.lo]
    label_w = max(cv2.getTextSize(_fmt(x), _FONT, _TICK_FONT, 1)[0][0] for x in labels) + 2 * _PAD
    out = np.full((h, panel.shape[1] + _PAD + _BAR_W + label_w, 3), 255, np.uint8)
    out[:, :panel.shape[1]] = panel
    idx = np.rint(np.linspace(255, 0, h)).astype(int)  # top row = hi
    x0 = panel.shape[1] + _PAD
    out[:, x0:x0 + _BAR_W] = scale.ramp[idx][:, None, :]
    out[:, x0:x0 + _BAR_W][[0, -1]] = 0  # a thin frame so a white end of the bar still reads as a bar
    out[:, x0][...] = 0
    out[:, x0 + _BAR_W - 1][...] = 0
    text_h = cv2.getTextSize("0", _FONT, _TICK_FONT, 1)[0][1]
    for value, y in zip(labels, (text_h + 1, h // 2 + text_h // 2, h - 2)):
        cv2.putText(out, _fmt(value), (x0 + _BAR_W + _PAD, int(y)), _FONT, _TICK_FONT, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def titled(img: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """`img` under one title bar per line of text (ASCII), widened with white on the right so no line is cut."""
    lines = [str(t) for t in lines if t]
    wide = max([cv2.getTextSize(t.encode("ascii", "replace").decode(), _FONT, _FONT_SCALE, 1)[0][0] + 2 * _PAD
                for t in lines] + [img.shape[1]])
    out = np.full((img.shape[0] + _TITLE_H * len(lines), wide, 3), 255, np.uint8)
    for k, text in enumerate(lines):
        cv2.putText(out, _fit_title(text, wide), (_PAD, (k + 1) * _TITLE_H - 7), _FONT, _FONT_SCALE,
                    (0, 0, 0), 1, cv2.LINE_AA)
    out[_TITLE_H * len(lines):, :img.shape[1]] = img
    return out


def figure(picture: np.ndarray, scale: ColourScale, title: str, *, min_height: int = 224) -> np.ndarray:
    """A picture people can read on its own: upscaled to `min_height`, colour bar with numbers, the title and
    the colour convention above."""
    return titled(with_colour_bar(upscale(picture, min_height), scale), [title, scale.caption])
