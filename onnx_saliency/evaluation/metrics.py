"""Faithfulness and localization metrics for saliency maps (definitions: ../shared/docs/methods-spec.md §7).

Every perturbed image of every input goes through the engine's cached forward session in batches of
`batch_size` (one ``engine.run`` per batch, across images and steps), so N images x S steps cost about
N*S/batch_size session calls. Scores are softmax probabilities of the explained class, computed from the
pre-softmax score tensor.

Maps are (N, H, W) at input resolution; higher means more salient. Signed maps are ranked by value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import SaliencyError

__all__ = ["Curve", "perturbation_curves", "deletion", "insertion", "confidence_change", "pointing_game",
           "energy_pointing_game", "localization", "constant_maps", "BASELINES", "AD_VARIANTS",
           "target_probabilities"]

BASELINES = ("zero", "blur", "mean")
AD_VARIANTS = ("gradcam++", "relevance-cam")
BLUR_KSIZE, BLUR_SIGMA = 11, 5.0  # RISE's substrate: gkern(klen=11, nsig=5)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _check(x: np.ndarray, maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3 or x.ndim != 4 or maps.shape[0] != x.shape[0] or maps.shape[1:] != x.shape[2:]:
        raise SaliencyError(f"metrics: maps {maps.shape} do not match inputs {x.shape} (need (N, H, W) at input size)")
    if not np.isfinite(maps).all():
        raise SaliencyError("metrics: saliency maps contain NaN or Inf")
    return maps


def constant_maps(maps: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """(N,) bool: maps whose values span no more than `rtol` of their magnitude; they rank nothing."""
    maps = np.asarray(maps, np.float64)
    span = maps.max(axis=(1, 2)) - maps.min(axis=(1, 2))
    scale = np.abs(maps).max(axis=(1, 2))
    return span <= rtol * np.maximum(scale, np.finfo(np.float32).tiny)


def _unit(maps: np.ndarray) -> np.ndarray:
    """Positive evidence min-max normalised to [0, 1] per map: negative values (signed maps: evidence
    against the class) become 0 first, so a signed map is not shifted into a uniform grey; for maps >= 0
    this is plain min-max. Constant maps become 0."""
    maps = np.maximum(np.asarray(maps, np.float64), 0)
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0.0)


def _ranks(maps: np.ndarray) -> np.ndarray:
    """(N, H*W) position of each pixel in descending saliency order (ties: row-major order)."""
    flat = maps.reshape(len(maps), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None].repeat(len(flat), 0), axis=1)
    return ranks


def baseline_images(x: np.ndarray, kind: str) -> np.ndarray:
    """The substrate perturbed pixels are taken from, in the (normalised) input space."""
    if kind == "zero":
        return np.zeros_like(x)
    if kind == "mean":
        return np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape).astype(np.float32)
    if kind == "blur":
        out = np.empty_like(x)
        for i, img in enumerate(x):
            hwc = np.ascontiguousarray(img.transpose(1, 2, 0))
            blurred = cv2.GaussianBlur(hwc, (BLUR_KSIZE, BLUR_KSIZE), BLUR_SIGMA)
            out[i] = blurred.reshape(hwc.shape).transpose(2, 0, 1)
        return out
    raise SaliencyError(f"baseline {kind!r}: expected one of {', '.join(BASELINES)}")


# ---------------------------------------------------------------------------------------------------------
# Scores


def _softmax_at(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    s = scores.astype(np.float64)
    if s.shape[1] == 1:  # one logit: a sigmoid classifier
        p = 1 / (1 + np.exp(-s[:, 0]))
        return np.where(targets == 0, p, 1 - p)
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e[np.arange(len(s)), targets] / e.sum(axis=1)


def _probabilities(engine, make_batch, n_jobs: int, job_targets: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax probability of each job's class; `make_batch(indices)` builds the job images on demand."""
    score = engine.model.score_tensor
    out = np.empty(n_jobs, np.float64)
    batch_size = max(1, int(batch_size))
    for start in range(0, n_jobs, batch_size):
        idx = np.arange(start, min(start + batch_size, n_jobs))
        batch = make_batch(idx)
        scores = engine.run(batch, job_targets[idx], outputs=[score], batch_size=len(idx))[score]
        out[idx] = _softmax_at(scores, job_targets[idx])
    return out


def target_probabilities(engine, x: np.ndarray, targets, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(resolved targets, softmax probability of them on x); -1 targets become the top-1 class."""
    targets = np.asarray(targets if targets is not None else np.full(len(x), -1), np.int64)
    score = engine.model.score_tensor
    scores = engine.run(x, targets, outputs=[score], batch_size=batch_size)[score]
    resolved = np.where(targets < 0, scores.argmax(axis=1), targets)
    return resolved, _softmax_at(scores, resolved)


def _resolve(engine, x, targets, batch_size) -> np.ndarray:
    targets = np.asarray(targets if targets is not None else np.full(len(x), -1), np.int64)
    if (targets < 0).any():
        targets = target_probabilities(engine, x, targets, batch_size)[0]
    n_classes = engine.model.num_classes
    if ((targets < 0) | (targets >= max(n_classes, 2))).any():
        raise SaliencyError(f"metrics: target classes {targets.tolist()} out of range 0..{n_classes - 1}")
    return targets


# ---------------------------------------------------------------------------------------------------------
# Deletion / insertion (RISE CausalMetric)


@dataclass
class Curve:
    """One deletion or insertion curve per image: probability after each step."""

    kind: str                 # "deletion" | "insertion"
    auc: np.ndarray           # (N,)
    probabilities: np.ndarray  # (N, S + 1): step 0 is before any pixel changes
    fractions: np.ndarray     # (S + 1,) share of pixels changed, 0..1 (the x axis)
    step: int                 # pixels changed per step
    baseline: str
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def perturbation_curves(engine, x: np.ndarray, maps: np.ndarray, targets=None, kinds=("deletion", "insertion"),
                        step: int = 224, deletion_baseline: str = "zero", insertion_baseline: str = "blur",
                        batch_size: int = 64) -> dict[str, Curve]:
    """Deletion (replace the most salient pixels by the baseline, `step` pixels at a time) and insertion
    (start from the baseline, restore the most salient pixels first), all channels of a pixel at once.

    AUC: trapezoid rule over the share of pixels changed (RISE's ``auc`` when H*W is a multiple of `step`).
    The curves of all kinds and images share the batches.
    """
    x = np.ascontiguousarray(x, np.float32)
    maps = _check(x, maps)
    kinds = tuple(kinds)
    for k in kinds:
        if k not in ("deletion", "insertion"):
            raise SaliencyError(f"perturbation curve {k!r}: expected deletion or insertion")
    step = int(step)
    if step < 1:
        raise SaliencyError(f"--step {step}: must be at least 1 pixel")
    n, _, h, w = x.shape
    hw = h * w
    n_steps = -(-hw // step)
    counts = np.minimum(np.arange(n_steps + 1) * step, hw)
    targets = _resolve(engine, x, targets, batch_size)
    ranks = _ranks(maps).reshape(n, 1, h, w)
    ends = {}  # kind -> (start images, finish images)
    if "deletion" in kinds:
        ends["deletion"] = (x, baseline_images(x, deletion_baseline))
    if "insertion" in kinds:
        ends["insertion"] = (baseline_images(x, insertion_baseline), x)
    # job j = (kind, image, step), step fastest: consecutive jobs reuse the same rank array
    jobs = [(k, i, s) for k in kinds for i in range(n) for s in range(n_steps + 1)]

    def make_batch(idx):
        out = np.empty((len(idx),) + x.shape[1:], np.float32)
        for row, j in enumerate(idx):
            kind, i, s = jobs[j]
            start, finish = ends[kind]
            np.copyto(out[row], start[i])
            changed = np.broadcast_to(ranks[i] < counts[s], x.shape[1:])
            np.copyto(out[row], finish[i], where=changed)
        return out

    job_targets = np.array([targets[i] for _, i, _ in jobs], np.int64)
    probs = _probabilities(engine, make_batch, len(jobs), job_targets, batch_size).reshape(len(kinds), n, n_steps + 1)
    fractions = counts / hw
    curves = {}
    for ki, kind in enumerate(kinds):
        p = probs[ki]
        auc = ((p[:, 1:] + p[:, :-1]) / 2 * np.diff(fractions)).sum(axis=1)
        curves[kind] = Curve(kind, auc, p, fractions, step,
                             deletion_baseline if kind == "deletion" else insertion_baseline, targets)
    return curves


def deletion(engine, x, maps, targets=None, step=224, baseline="zero", batch_size=64) -> Curve:
    """Lower AUC is better."""
    return perturbation_curves(engine, x, maps, targets, ("deletion",), step, deletion_baseline=baseline,
                               batch_size=batch_size)["deletion"]


def insertion(engine, x, maps, targets=None, step=224, baseline="blur", batch_size=64) -> Curve:
    """Higher AUC is better."""
    return perturbation_curves(engine, x, maps, targets, ("insertion",), step, insertion_baseline=baseline,
                               batch_size=batch_size)["insertion"]


# ---------------------------------------------------------------------------------------------------------
# Average Drop / Increase in Confidence


def confidence_change(engine, x: np.ndarray, maps: np.ndarray, targets=None, variant: str = "gradcam++",
                      keep: float | None = None, space: str | None = None, pixel_zero=None,
                      batch_size: int = 64) -> dict:
    """Average Drop (AD, %) and Increase in Confidence (IC, %) per image, on softmax probabilities.

    The masked input is x weighted by the normalised map N(L) (positive part, min-max), optionally only its top `keep`
    share of pixels (the rest zeroed). `space` says what is weighted: "input" multiplies the normalised
    input tensor (pytorch-grad-cam's convention); "pixel" multiplies the image's pixels and normalises
    again, which for an affine preprocessing is ``zero + (x - zero) * m`` with `pixel_zero` the normalised
    value of a black pixel per channel (``preprocess.input_bounds(pre)[0]``).

    Variants (state them in reports):
    - "gradcam++" (Chattopadhay et al.): whole map, space "input". AD_i = 100 max(0, Y-O)/Y and
      IC_i = 100 [Y < O]; the means over images are AD and IC.
    - "relevance-cam" (Lee et al., author's issue #5): top 50 % of the map, space "pixel". AD_i is NaN for
      images whose confidence does not drop, so the NaN-ignoring mean divides by the images that drop;
      IC_i = 100 [Y - O <= 0] (ties count as increases).
    Returns {"average_drop", "increase_confidence", "y", "o", "targets", "variant", "keep", "space"}.
    """
    if variant not in AD_VARIANTS:
        raise SaliencyError(f"--ad-variant {variant!r}: expected one of {', '.join(AD_VARIANTS)}")
    x = np.ascontiguousarray(x, np.float32)
    maps = _check(x, maps)
    rc = variant == "relevance-cam"
    keep = (0.5 if rc else None) if keep is None else float(keep)
    space = space or ("pixel" if rc else "input")
    if keep is not None and not 0 < keep <= 1:
        raise SaliencyError(f"keep {keep}: must be in (0, 1]")
    if space not in ("input", "pixel"):
        raise SaliencyError(f"space {space!r}: expected input or pixel")
    if space == "pixel" and pixel_zero is None:
        raise SaliencyError("space 'pixel' needs pixel_zero (the normalised value of a black pixel per channel)")
    n, c, h, w = x.shape
    weights = _unit(maps)
    if keep is not None:
        kept = _ranks(maps) < int(np.ceil(keep * h * w))
        weights = weights * kept.reshape(weights.shape)
    weights = weights.astype(np.float32)[:, None]
    targets = _resolve(engine, x, targets, batch_size)
    zero = None if space == "input" else np.asarray(pixel_zero, np.float32).reshape(1, c, 1, 1)

    def make_batch(idx):  # jobs 0..n-1: the clean images, n..2n-1: the masked ones; batches may mix both
        i = idx % n
        clean = x[i]
        masked = clean * weights[i] if zero is None else zero + (clean - zero) * weights[i]
        return np.where((idx >= n)[:, None, None, None], masked, clean)

    p = _probabilities(engine, make_batch, 2 * n, np.concatenate([targets, targets]), batch_size)
    y, o = p[:n], p[n:]
    drop = np.maximum(0.0, y - o) / np.maximum(y, np.finfo(np.float64).tiny) * 100
    if rc:
        ad = np.where(y - o > 0, drop, np.nan)
        ic = np.where(y - o <= 0, 100.0, 0.0)
    else:
        ad = drop
        ic = np.where(y < o, 100.0, 0.0)
    return {"average_drop": ad, "increase_confidence": ic, "y": y, "o": o, "targets": targets,
            "variant": variant, "keep": keep, "space": space}


# ---------------------------------------------------------------------------------------------------------
# Localization (needs regions from annotations.InputRegions)


def _peak(m: np.ndarray) -> tuple[int, int]:
    """(row, col) of the first maximum in row-major order (TorchRay takes argmax too)."""
    return np.unravel_index(int(np.argmax(m)), m.shape)


def _distance_to_boxes(px: float, py: float, boxes: np.ndarray) -> float:
    if len(boxes) == 0:
        return np.inf
    dx = np.maximum.reduce([boxes[:, 0] - px, np.zeros(len(boxes)), px - boxes[:, 2]])
    dy = np.maximum.reduce([boxes[:, 1] - py, np.zeros(len(boxes)), py - boxes[:, 3]])
    return float(np.hypot(dx, dy).min())


def pointing_game(maps: np.ndarray, regions, tolerance: float = 15.0) -> np.ndarray:
    """(N,) 1.0 hit / 0.0 miss: the map's maximum lies within `tolerance` input pixels of a box (distance
    from the pixel centre to the box) or a mask pixel. Constant maps point nowhere: a miss."""
    maps = np.asarray(maps)
    _check_regions(maps, regions)
    flat = constant_maps(maps)
    hits = np.zeros(len(maps))
    for i, (m, reg) in enumerate(zip(maps, regions)):
        if flat[i]:
            continue
        r, c = _peak(m)
        if reg.mask is not None:
            if reg.mask.any():
                outside = (~reg.mask).astype(np.uint8)  # distanceTransform: distance to the nearest 0 pixel
                hits[i] = float(cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[r, c] <= tolerance)
        else:
            hits[i] = float(_distance_to_boxes(c + 0.5, r + 0.5, reg.boxes) <= tolerance)
    return hits


def energy_pointing_game(maps: np.ndarray, regions) -> np.ndarray:
    """(N,) share of the normalised map (positive part, min-max) inside the boxes/mask (Score-CAM); 0..1,
    higher is better.
    A constant map spreads evenly: its value is the area share of the region."""
    maps = np.asarray(maps)
    _check_regions(maps, regions)
    unit = _unit(maps)
    out = np.zeros(len(maps))
    for i, (u, reg) in enumerate(zip(unit, regions)):
        inside = reg.union_mask()
        total = u.sum()
        out[i] = u[inside].sum() / total if total > 0 else inside.mean()
    return out


def localization(maps: np.ndarray, regions, threshold: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """(IoU (N,), predicted boxes (N, 4)): threshold the normalised map (positive part, min-max) at `threshold`, box the
    largest 8-connected component, best IoU with a ground-truth box (ILSVRC: correct when >= 0.5)."""
    maps = np.asarray(maps)
    _check_regions(maps, regions)
    if not 0 <= threshold <= 1:
        raise SaliencyError(f"--threshold {threshold}: must be in [0, 1]")
    unit = _unit(maps)
    ious, boxes = np.zeros(len(maps)), np.zeros((len(maps), 4))
    for i, (u, reg) in enumerate(zip(unit, regions)):
        binary = (u >= threshold) & (u > 0)
        n_labels, _, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
        if n_labels < 2:
            continue
        k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        x0, y0 = stats[k, cv2.CC_STAT_LEFT], stats[k, cv2.CC_STAT_TOP]
        box = np.array([x0, y0, x0 + stats[k, cv2.CC_STAT_WIDTH], y0 + stats[k, cv2.CC_STAT_HEIGHT]], float)
        boxes[i] = box
        truth = reg.boxes if len(reg.boxes) else _mask_box(reg.mask)
        ious[i] = _iou(box, truth).max() if len(truth) else 0.0
    return ious, boxes


def _mask_box(mask) -> np.ndarray:
    if mask is None or not mask.any():
        return np.zeros((0, 4))
    rows, cols = np.nonzero(mask)
    return np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], float)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.where(union > 0, union, 1)


def _check_regions(maps: np.ndarray, regions) -> None:
    if maps.ndim != 3 or len(regions) != len(maps):
        raise SaliencyError(f"metrics: {len(regions)} annotated regions for {len(maps)} maps")
    for reg in regions:
        if tuple(reg.hw) != maps.shape[1:]:
            raise SaliencyError(f"metrics: annotations mapped to {reg.hw}, maps are {maps.shape[1:]}")
