"""Line charts and picture strips drawn with OpenCV (no matplotlib at runtime). Images are RGB uint8."""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from ..output.postprocess import colorize

__all__ = ["line_chart", "map_strip", "stack_vertical", "PALETTE"]

# Okabe-Ito colours (distinguishable with colour-vision deficiencies) for few lines; tab20 for many
PALETTE = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
           (240, 228, 66), (0, 0, 0)]
PALETTE_MANY = [(31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
                (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
                (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
                (23, 190, 207), (158, 218, 229)]
MAX_BANDS = 4  # more overlapping bands are unreadable
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(img, text, org, scale=0.4, color=(0, 0, 0), thickness=1):
    cv2.putText(img, text, (int(org[0]), int(org[1])), FONT, scale, color, thickness, cv2.LINE_AA)


def _text_width(text, scale=0.4, thickness=1) -> int:
    return cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "", xlabel: str = "",
               ylabel: str = "", x_range: tuple[float, float] | None = None,
               y_range: tuple[float, float] | None = None, size: tuple[int, int] = (420, 640),
               x_ticks: Sequence[tuple[float, str]] | None = None, bands: dict | None = None) -> np.ndarray:
    """series: name -> (x, y), one coloured line each with a legend; NaN points are skipped.
    bands: name -> (x, low, high), a light band drawn under the line of the same name (e.g. mean +- std)."""
    h, w = size
    palette = PALETTE if len(series) <= len(PALETTE) else PALETTE_MANY
    bands = bands if bands and len(series) <= MAX_BANDS else None
    # the legend gets its own column right of the frame, and the picture grows to fit it
    legend_w = max([_text_width(n) for n in series] + [0]) + 40
    h = max(h, (30 if title else 12) + 16 * len(series) + 20)
    w = w + legend_w
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 58, 16 + legend_w, 30 if title else 12, 44
    xs = [np.asarray(v[0], float) for v in series.values()]
    ys = [np.asarray(v[1], float) for v in series.values()]
    finite = [y[np.isfinite(y)] for y in ys] + [np.asarray(b[1], float) for b in (bands or {}).values()] \
        + [np.asarray(b[2], float) for b in (bands or {}).values()]
    finite = [f[np.isfinite(f)] for f in finite if len(f)]
    allx = np.concatenate(xs) if xs else np.zeros(1)
    x0, x1 = x_range or (float(allx.min()), float(allx.max()))
    if y_range is None:
        vals = np.concatenate(finite) if finite and any(len(f) for f in finite) else np.zeros(1)
        y0, y1 = float(vals.min()), float(vals.max())
        pad = 0.05 * (y1 - y0 or 1)
        y0, y1 = y0 - pad, y1 + pad
    else:
        y0, y1 = y_range
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    grey, dark = (225, 225, 225), (90, 90, 90)
    ticks = x_ticks if x_ticks is not None else [(t, f"{t:g}") for t in _ticks(x0, x1)]
    for t, label in ticks:
        X, _ = px(t, y0)
        cv2.line(img, (int(X), top), (int(X), h - bottom), grey, 1)
        _text(img, label, (X - _text_width(label, 0.35) / 2, h - bottom + 14), 0.35, dark)
    for t in _ticks(y0, y1):
        _, Y = px(x0, t)
        cv2.line(img, (left, int(Y)), (w - right, int(Y)), grey, 1)
        label = f"{t:.3g}"
        _text(img, label, (left - 6 - _text_width(label, 0.35), Y + 4), 0.35, dark)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), dark, 1)
    for k, name in enumerate(series):
        color = palette[k % len(palette)]
        if bands and name in bands:
            bx, lo, hi = (np.asarray(v, float) for v in bands[name])
            ok = np.isfinite(lo) & np.isfinite(hi)
            poly = [px(a, b) for a, b in zip(bx[ok], hi[ok])] + [px(a, b) for a, b in zip(bx[ok][::-1], lo[ok][::-1])]
            if poly:
                overlay = img.copy()
                cv2.fillPoly(overlay, [np.round(np.array(poly)).astype(np.int32)], color)
                img = cv2.addWeighted(overlay, 0.15, img, 0.85, 0)
    for k, (name, (x, y)) in enumerate(series.items()):
        color = palette[k % len(palette)]
        pts = [px(a, b) for a, b in zip(np.asarray(x, float), np.asarray(y, float)) if np.isfinite(b)]
        pts = np.round(np.array(pts)).astype(np.int32) if pts else np.zeros((0, 2), np.int32)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, color, 2, cv2.LINE_AA)
        if len(pts) <= 40 and len(series) <= len(PALETTE):  # markers only while they stay legible
            for p in pts:
                cv2.circle(img, tuple(int(v) for v in p), 3, color, -1, cv2.LINE_AA)
    lx = w - legend_w + 4
    for k, name in enumerate(series):
        y = top + 12 + 16 * k
        cv2.line(img, (lx, y - 4), (lx + 18, y - 4), palette[k % len(palette)], 3)
        _text(img, name, (lx + 24, y))
    if title:
        _text(img, title, (left, 20), 0.5, (0, 0, 0), 1)
    if xlabel:
        _text(img, xlabel, ((w + left - right) / 2 - _text_width(xlabel) / 2, h - 8))
    if ylabel:
        label = np.full((20, _text_width(ylabel) + 8, 3), 255, np.uint8)
        _text(label, ylabel, (4, 14))
        rotated = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
        y_start = max(0, int((h - rotated.shape[0]) / 2))
        region = img[y_start:y_start + rotated.shape[0], 2:2 + rotated.shape[1]]
        region[...] = rotated[:region.shape[0], :region.shape[1]]
    return img


def map_strip(maps: Sequence[np.ndarray], labels: Sequence[str], tile: int = 112, colormap: str = "jet",
              display: np.ndarray | None = None) -> np.ndarray:
    """A row of colourised maps (each min-max normalised) with a caption under each; the input image first
    when `display` is given."""
    tiles = []
    items = ([(display, "input")] if display is not None else []) + list(zip(maps, labels))
    for picture, label in items:
        if picture.ndim == 2:
            m = np.asarray(picture, np.float64)
            span = m.max() - m.min()
            picture = colorize(((m - m.min()) / span if span > 0 else np.zeros_like(m)).astype(np.float32), colormap)
        t = cv2.resize(np.ascontiguousarray(picture), (tile, tile), interpolation=cv2.INTER_AREA)
        cell = np.full((tile + 34, tile + 6, 3), 255, np.uint8)
        cell[3:3 + tile, 3:3 + tile] = t
        for row, part in enumerate(_wrap(label, tile, 0.33)[:2]):
            _text(cell, part, (3, tile + 15 + 12 * row), 0.33)
        tiles.append(cell)
    return np.concatenate(tiles, axis=1) if tiles else np.full((tile, tile, 3), 255, np.uint8)


def _wrap(text: str, width: int, scale: float) -> list[str]:
    lines, line = [], ""
    for ch in text:
        if _text_width(line + ch, scale) > width and line:
            lines.append(line)
            line = ""
        line += ch
    return lines + ([line] if line else [])


def stack_vertical(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack RGB images top to bottom on a white background (left aligned)."""
    width = max(i.shape[1] for i in images)
    rows = [np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255) for i in images]
    return np.concatenate(rows, axis=0)
