"""Model-parameter randomisation tests (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

Cascading: randomise the top layer, then the top two, ... down to the input layer. Independent: randomise
one layer at a time. After each step the method explains the *same* classes as on the original model, and
the maps are compared with the original ones by Spearman rank correlation and SSIM. A method whose maps
survive randomisation (correlation staying high) does not depend on what the model learned.

By default both comparisons use absolute values (Adebayo et al.'s "ABS" variant), and SSIM compares maps
min-max normalised to [0, 1] (data range 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from graph_passes.randomize import CASCADE, parameter_layers, randomize_weights

from ..engine import Engine
from ..errors import SaliencyError
from ..methods import get_method
from ..methods.base import Request

__all__ = ["SanityResult", "randomization_test", "spearman", "ssim", "rankdata"]

MODES = ("cascading", "independent")


# ---------------------------------------------------------------------------------------------------------
# Similarities (numpy only: no scipy/skimage at runtime)


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their average rank (scipy's 'average' method)."""
    values = np.asarray(values)
    flat = values.reshape(-1, values.shape[-1])
    out = np.empty(flat.shape, np.float64)
    for row, v in enumerate(flat):
        order = np.argsort(v, kind="stable")
        sorted_v = v[order]
        starts = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
        group = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        sizes = np.diff(np.r_[first, len(v)])
        average = first + (sizes + 1) / 2.0  # mean of ranks first+1 .. first+size
        out[row, order] = average[group]
    return out.reshape(values.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (..., H, W) -> (...); NaN where a map is constant."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ra = rankdata(a.reshape(*a.shape[:-2], -1))
    rb = rankdata(b.reshape(*b.shape[:-2], -1))
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(-1) / np.where(denom > 0, denom, 1), np.nan)


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage.gaussian_filter's radius
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation with scipy's mode='reflect' border (edge sample repeated: numpy 'symmetric')."""
    r = len(kernel) // 2
    padded = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(r, r), (r, r)], mode="symmetric")
    h, w = img.shape[-2:]
    rows = sum(kernel[k] * padded[..., k:k + h, :] for k in range(len(kernel)))
    return sum(kernel[k] * rows[..., :, k:k + w] for k in range(len(kernel)))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5, truncate: float = 3.5,
         k1: float = 0.01, k2: float = 0.03, sample_covariance: bool = True) -> np.ndarray:
    """Mean SSIM of each pair of maps (..., H, W) -> (...), as
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, data_range=data_range)``:
    Gaussian window sigma 1.5 (11 taps), sample covariance (skimage's default), means over the image
    without the 5-pixel border the window cannot fill."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    kernel = _gaussian_kernel(sigma, truncate)
    win = len(kernel)
    if min(a.shape[-2:]) < win:
        raise SaliencyError(f"ssim: maps of {a.shape[-2]}x{a.shape[-1]} are smaller than the {win}x{win} window")
    n_pix = win ** 2
    cov_norm = n_pix / (n_pix - 1) if sample_covariance else 1.0
    ux, uy = _filter(a, kernel), _filter(b, kernel)
    uxx, uyy, uxy = _filter(a * a, kernel), _filter(b * b, kernel), _filter(a * b, kernel)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return s[..., pad:-pad, pad:-pad].mean(axis=(-2, -1))


def _unit(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, np.float64)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0.0)


# ---------------------------------------------------------------------------------------------------------
# The test


@dataclass
class SanityResult:
    method: str
    mode: str                  # "cascading" | "independent"
    layers: list[str]          # parameter layers from the top (output side) down
    steps: list[int]           # cascading: how many top layers are random; independent: index into `layers`
    spearman: np.ndarray       # (S, N)
    ssim: np.ndarray           # (S, N)
    original: np.ndarray       # (N, H, W) maps of the original model
    maps: np.ndarray | None    # (S, N, H, W) randomised maps, when kept
    targets: np.ndarray        # (N,) classes explained throughout
    absolute: bool
    seed: int

    def step_labels(self) -> list[str]:
        if self.mode == "cascading":
            return [f"top {k}: {self.layers[k - 1]}" if k else "original" for k in self.steps]
        return [self.layers[k] for k in self.steps]


def randomization_test(model, x: np.ndarray, targets: np.ndarray, method: str, layers=(), options=None,
                       mode: str = "cascading", steps=None, seed: int = 0, absolute: bool = True,
                       batch_size: int = 32, provider: str = "cpu", threads: int | None = None,
                       keep_maps: bool = True, progress=None) -> SanityResult:
    """Explain `x` with `method` on randomised copies of `model` (a LoadedModel) and compare with the
    original maps.

    targets: resolved classes (>= 0), normally the classes the original explanation used.
    steps: cascading: numbers of top layers to randomise (default 1..L); independent: layer indices
    counted from the top (default 0..L-1). `progress(k)` is called after each step.
    """
    if mode not in MODES:
        raise SaliencyError(f"sanity mode {mode!r}: expected cascading or independent")
    targets = np.asarray(targets, np.int64)
    if (targets < 0).any():
        raise SaliencyError("sanity checks need resolved target classes (>= 0), so every model explains the same")
    top_down = parameter_layers(model.canonical)[::-1]
    if not top_down:
        raise SaliencyError(f"{model.path.name}: no layer with learned weights to randomise")
    count = len(top_down)
    if steps is None:
        steps = list(range(1, count + 1)) if mode == "cascading" else list(range(count))
    steps = [int(s) for s in steps]
    valid = range(0, count + 1) if mode == "cascading" else range(count)
    bad = [s for s in steps if s not in valid]
    if bad:
        raise SaliencyError(f"sanity {mode} step {bad[0]}: expected {valid.start}..{valid.stop - 1} "
                            f"({count} layers with weights)")
    m = get_method(method)
    options = dict(options or {})

    def explain(loaded) -> np.ndarray:
        engine = Engine(loaded, provider=provider, threads=threads)
        return m.explain(Request(engine, x, targets, list(layers), options, batch_size)).maps

    original = explain(model)
    rand_maps = []
    for k in steps:
        if mode == "cascading":
            graph = randomize_weights(model.canonical, CASCADE, seed=seed, step=k)
        else:
            graph = randomize_weights(model.canonical, [top_down[k]], seed=seed)
        rand_maps.append(explain(dataclasses.replace(model, canonical=graph)))
        if progress is not None:
            progress(k)
    rand = np.stack(rand_maps)
    a = np.abs(original) if absolute else original
    b = np.abs(rand) if absolute else rand
    return SanityResult(m.name, mode, top_down, steps, spearman(a[None], b), ssim(_unit(a)[None], _unit(b)),
                        original, rand if keep_maps else None, targets, absolute, seed)
