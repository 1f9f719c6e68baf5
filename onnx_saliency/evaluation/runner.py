"""Evaluate methods on images: explain in batches, then run the chosen metrics on the maps.

The CLI (`onnx-saliency evaluate`) and benchmarks/make_results.py both call :func:`evaluate`; it returns
per-image values, curves and sanity results, and :func:`summary` turns them into the method x metric table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics as M
from .annotations import ImageAnnotation, find
from ..errors import SaliencyError
from ..methods import get_method
from ..methods.base import Request
from ..output.batch import method_error
from ..intake.preprocess import input_bounds, load_image
from .sanity import SanityResult, randomization_test

METRICS = ("deletion", "insertion", "average-drop", "increase-confidence", "pointing-game",
           "energy-pointing-game", "localization", "sanity-cascading", "sanity-independent")
DEFAULT_METRICS = ("deletion", "insertion", "average-drop", "increase-confidence")
LOCALIZATION_METRICS = ("pointing-game", "energy-pointing-game", "localization")
# metric -> the per-image columns it produces
COLUMNS = {
    "deletion": ["deletion_auc"], "insertion": ["insertion_auc"],
    "average-drop": ["average_drop"], "increase-confidence": ["increase_confidence"],
    "pointing-game": ["pointing_game"], "energy-pointing-game": ["energy_pointing_game"],
    "localization": ["localization_iou", "localization_correct"],
    "sanity-cascading": ["cascade_spearman", "cascade_ssim"],
    "sanity-independent": ["independent_spearman", "independent_ssim"],
}
LOWER_IS_BETTER = {"deletion_auc", "average_drop", "cascade_spearman", "cascade_ssim", "independent_spearman",
                   "independent_ssim"}
COLUMN_TITLES = {
    "deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC", "average_drop": "AD %",
    "increase_confidence": "IC %", "pointing_game": "pointing %", "energy_pointing_game": "energy PG",
    "localization_iou": "loc. IoU", "localization_correct": "loc. acc %", "cascade_spearman": "cascade rho",
    "cascade_ssim": "cascade SSIM", "independent_spearman": "indep. rho", "independent_ssim": "indep. SSIM",
}


@dataclass
class Settings:
    step: int = 224                       # pixels per deletion/insertion step
    deletion_baseline: str = "zero"
    insertion_baseline: str = "blur"
    ad_variant: str = "gradcam++"
    ad_keep: float | None = None          # None: the variant's default (all / top 50 %)
    ad_space: str | None = None           # None: the variant's default (input / pixel)
    tolerance: float = 15.0               # pointing game, input pixels
    threshold: float = 0.15               # localization, share of the map's range
    sanity_steps: int = 0                 # 0: every layer; k: k steps spread evenly from the top
    sanity_images: int | None = None      # None: all images
    seed: int = 0
    batch_size: int = 16                  # images per explanation batch
    metric_batch_size: int = 64           # perturbed images per session call
    layers: list = field(default_factory=lambda: ["auto"])
    target: object = None                 # None/top1, "gt" (annotated class), index/label, or a list
    options: dict = field(default_factory=dict)

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        d["options"] = {k: v for k, v in self.options.items() if not isinstance(v, np.ndarray)}
        return d


@dataclass
class Evaluation:
    model: str
    model_sha256: str
    images: list[str]
    methods: list[str]
    metrics: list[str]
    settings: Settings
    preprocessing: dict
    rows: list[dict]                                   # one per (image, method)
    curves: dict = field(default_factory=dict)         # method -> kind -> Curve over all images
    sanity: dict = field(default_factory=dict)         # method -> mode -> SanityResult
    sanity_display: np.ndarray | None = None           # display image of the first sanity image
    failed: dict = field(default_factory=dict)         # method -> "image: reason"; left out of everything
    assumptions: list = field(default_factory=list)    # what the explainer assumed (Explainer.assumptions)
    skipped: dict = field(default_factory=dict)        # image name -> why it was left out (unreadable, bad boxes)

    @property
    def columns(self) -> list[str]:
        return [c for m in self.metrics for c in COLUMNS[m]]


def _pick_steps(count: int, mode: str, wanted: int) -> list[int]:
    """Every layer, or `wanted` steps spread evenly from the top, always including the deepest one."""
    full = list(range(1, count + 1)) if mode == "cascading" else list(range(count))
    if wanted <= 0 or wanted >= count:
        return full
    picks = np.unique(np.round(np.linspace(0, count - 1, wanted)).astype(int))
    return [full[i] for i in picks]


def _targets(explainer, spec, pictures_n: int, annotated: list[ImageAnnotation | None], names) -> np.ndarray:
    if isinstance(spec, str) and spec.lower() in ("gt", "annotated"):
        out = []
        for ann, name in zip(annotated, names):
            if ann is None or not ann.classes:
                raise SaliencyError(f"--target gt: image {name} has no annotated class")
            n = explainer.model.num_classes
            if not 0 <= ann.classes[0] < n:
                raise SaliencyError(f"{ann.source}: images[{name!r}]: annotated class {ann.classes[0]} is beyond "
                                    f"the model's {n} classes (0..{n - 1})")
            out.append(ann.classes[0])
        return np.array(out, np.int64)
    return explainer.targets(spec, pictures_n)


def evaluate(explainer, images: list[Path], methods: list[str], metrics: list[str],
             annotations: dict[str, ImageAnnotation] | None = None, annotations_source=None,
             settings: Settings | None = None, progress=None, on_failure=None) -> Evaluation:
    """Explain every image with every method and compute `metrics`; `progress(units)` reports work done
    (one unit per image and method, plus one per sanity step and method).

    A method that fails (it cannot run on these images, NaN/Inf, out of memory) is left out of the whole
    evaluation, so that every number in the table covers the same images; `on_failure(line)` hears of it once
    per image of the batch it failed on, and :attr:`Evaluation.failed` keeps the reason."""
    s = settings or Settings()
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise SaliencyError(f"--metric {unknown[0]!r}: unknown; known: {', '.join(METRICS)}")
    if any(m in LOCALIZATION_METRICS for m in metrics) and annotations is None:
        needs = next(m for m in metrics if m in LOCALIZATION_METRICS)
        raise SaliencyError(f"--metric {needs}: needs --annotations FILE (boxes or masks per image)")
    if s.batch_size < 1 or s.metric_batch_size < 1:
        raise SaliencyError("--batch-size must be at least 1")
    method_objs = [get_method(m) for m in methods]
    layer_names = [explainer.resolve_layer(spec) for spec in s.layers]
    annotated = [find(annotations, p, annotations_source) if annotations is not None else None for p in images]
    kept, pictures, skipped = [], [], {}
    for p, ann in zip(images, annotated):  # one unreadable image, or one whose boxes miss it, is skipped
        try:
            picture = load_image(p)
            if ann is not None:
                ann.check_inside(picture.shape[:2])
            explainer.prepare([picture])  # sizes the model refuses fail here, per image
        except SaliencyError as err:
            line = str(err) if str(err).startswith(str(p)) else f"{p}: {err}"
            skipped[p.name] = line
            if on_failure is not None:
                on_failure(line)
            continue
        kept.append((p, ann))
        pictures.append(picture)
    if not kept:
        raise SaliencyError(f"none of the {len(images)} image(s) could be evaluated ({next(iter(skipped.values()))})")
    images, annotated = [p for p, _ in kept], [a for _, a in kept]
    targets_all = _targets(explainer, s.target, len(images), annotated, [p.name for p in images])
    pre = explainer.preprocessing
    rows: list[dict] = []
    curve_parts: dict = {m.name: {} for m in method_objs}
    sanity_inputs: dict = {}
    failed: dict[str, str] = {}
    for start in range(0, len(images), s.batch_size):
        chunk = list(range(start, min(start + s.batch_size, len(images))))
        x, _ = explainer.prepare([pictures[i] for i in chunk])
        for m in method_objs:
            if m.name in failed:
                if progress is not None:
                    progress(len(chunk))
                continue
            try:
                rows += _score_chunk(explainer, m, x, chunk, images, pictures, targets_all, layer_names, metrics,
                                     annotations, annotated, s, curve_parts, sanity_inputs)
            except Exception as err:  # noqa: BLE001 - one method's failure must not cost the others' numbers
                reason = method_error(err)
                failed[m.name] = f"{images[chunk[0]]}: {reason}"
                for i in chunk:
                    if on_failure is not None:
                        on_failure(f"{images[i]}: " + (reason if reason.startswith(f"-m {m.name}:")
                                                       else f"-m {m.name}: {reason}"))
                rows = [r for r in rows if r["method"] != m.name]
                curve_parts.pop(m.name, None)
                sanity_inputs.pop(m.name, None)
            if progress is not None:
                progress(len(chunk))
    method_objs = [m for m in method_objs if m.name not in failed]
    evaluation = Evaluation(str(explainer.model.path), explainer.model.sha256, [p.name for p in images],
                            [m.name for m in method_objs], list(metrics), s, dataclasses.asdict(pre), rows,
                            failed=failed, assumptions=list(getattr(explainer, "assumptions", [])),
                            skipped=skipped)
    evaluation.curves = {name: {kind: _join(parts) for kind, parts in kinds.items()}
                         for name, kinds in curve_parts.items() if kinds}
    _run_sanity(evaluation, explainer, method_objs, layer_names, sanity_inputs, pictures, progress, on_failure)
    return evaluation


def _score_chunk(explainer, m, x, chunk, images, pictures, targets_all, layer_names, metrics, annotations,
                 annotated, s, curve_parts, sanity_inputs) -> list[dict]:
    """One method on one batch of images: its maps, every chosen metric, the rows; curves and sanity inputs
    are kept aside in `curve_parts` and `sanity_inputs`."""
    pre = explainer.preprocessing
    pixel_zero = input_bounds(pre)[0]
    label = explainer.model.label
    rows = []
    req = Request(explainer.engine, x, targets_all[chunk], layer_names if m.uses_layer else [],
                  dict(s.options), s.batch_size)
    result = m.explain(req)
    maps, targets = result.maps, np.asarray(result.targets, np.int64)
    values: dict[str, np.ndarray] = {}
    flat = M.constant_maps(maps)
    kinds = [k for k in ("deletion", "insertion") if k in metrics]
    if kinds:
        curves = M.perturbation_curves(explainer.engine, x, maps, targets, kinds, s.step,
                                       s.deletion_baseline, s.insertion_baseline, s.metric_batch_size)
        for kind, curve in curves.items():
            values[f"{kind}_auc"] = curve.auc
            curve_parts[m.name].setdefault(kind, []).append(curve)
    if "average-drop" in metrics or "increase-confidence" in metrics:
        cc = M.confidence_change(explainer.engine, x, maps, targets, s.ad_variant, s.ad_keep, s.ad_space,
                                 pixel_zero, s.metric_batch_size)
        values["average_drop"], values["increase_confidence"] = cc["average_drop"], cc["increase_confidence"]
    regions = None
    if annotations is not None:
        regions = [annotated[i].regions(int(t), pictures[i].shape[:2], pre) for i, t in zip(chunk, targets)]
        if "pointing-game" in metrics:
            values["pointing_game"] = M.pointing_game(maps, regions, s.tolerance) * 100
        if "energy-pointing-game" in metrics:
            values["energy_pointing_game"] = M.energy_pointing_game(maps, regions)
        if "localization" in metrics:
            iou, _ = M.localization(maps, regions, s.threshold)
            values["localization_iou"], values["localization_correct"] = iou, (iou >= 0.5) * 100.0
    for row, i in enumerate(chunk):
        entry = {"image": images[i].name, "method": m.name, "target": int(targets[row]),
                 "label": label(int(targets[row])), "score": float(result.scores[row]),
                 "constant_map": bool(flat[row])}
        if regions is not None:
            entry["annotated_class_matched"] = bool(regions[row].matched)
        entry.update({k: float(v[row]) for k, v in values.items()})
        rows.append(entry)
    if any(mm.startswith("sanity") for mm in metrics):
        limit = len(images) if s.sanity_images is None else s.sanity_images
        keep = [r for r, i in enumerate(chunk) if i < limit]
        if keep:
            part = sanity_inputs.setdefault(m.name, {"x": [], "targets": [], "index": []})
            part["x"].append(x[keep])
            part["targets"].append(targets[keep])
            part["index"] += [chunk[r] for r in keep]
    return rows


def _join(curves: list) -> M.Curve:
    first = curves[0]
    return M.Curve(first.kind, np.concatenate([c.auc for c in curves]),
                   np.concatenate([c.probabilities for c in curves]), first.fractions, first.step, first.baseline,
                   np.concatenate([c.targets for c in curves]))


def sanity_step_count(explainer, settings: Settings, metrics) -> int:
    """How many randomised models each method is explained on (for progress bars)."""
    from graph_passes.randomize import parameter_layers

    count = len(parameter_layers(explainer.model.canonical))
    return sum(len(_pick_steps(count, mode, settings.sanity_steps))
               for mode in ("cascading", "independent") if f"sanity-{mode}" in metrics)


def _run_sanity(evaluation: Evaluation, explainer, method_objs, layer_names, inputs, pictures, progress,
                on_failure=None) -> None:
    s = evaluation.settings
    from graph_passes.randomize import parameter_layers

    count = len(parameter_layers(explainer.model.canonical))
    by_key = {(r["image"], r["method"]): r for r in evaluation.rows}
    for m in method_objs:
        if m.name not in inputs:
            continue
        x = np.concatenate(inputs[m.name]["x"])
        targets = np.concatenate(inputs[m.name]["targets"])
        index = inputs[m.name]["index"]
        for mode in ("cascading", "independent"):
            if f"sanity-{mode}" not in evaluation.metrics:
                continue
            try:
                result: SanityResult = randomization_test(
                    explainer.model, x, targets, m.name, layer_names if m.uses_layer else [], dict(s.options), mode,
                    _pick_steps(count, mode, s.sanity_steps), s.seed, batch_size=s.batch_size,
                    provider=explainer.engine.provider, threads=explainer.engine.threads,
                    progress=(lambda _k: progress(1)) if progress is not None else None)
            except Exception as err:  # noqa: BLE001 - the method's other metrics stand; its sanity cells stay empty
                reason = f"-m {m.name}: sanity-{mode}: {method_error(err)}"
                evaluation.failed[f"{m.name} sanity-{mode}"] = reason
                if on_failure is not None:
                    on_failure(reason)
                continue
            evaluation.sanity.setdefault(m.name, {})[mode] = result
            prefix = "cascade" if mode == "cascading" else "independent"
            for row, i in enumerate(index):
                entry = by_key[(evaluation.images[i], m.name)]
                if mode == "cascading":  # the last step: every layer random (or the deepest step asked for)
                    entry[f"{prefix}_spearman"] = float(result.spearman[-1, row])
                    entry[f"{prefix}_ssim"] = float(result.ssim[-1, row])
                else:  # independent: the mean over the layers randomised one at a time
                    entry[f"{prefix}_spearman"] = float(np.nanmean(result.spearman[:, row]))
                    entry[f"{prefix}_ssim"] = float(np.nanmean(result.ssim[:, row]))
    if evaluation.sanity and inputs:
        first = min(i for part in inputs.values() for i in part["index"])
        evaluation.sanity_display = explainer.prepare([pictures[first]])[1][0]


def summary(evaluation: Evaluation) -> dict:
    """method -> column -> {"mean", "std", "n"} over images (NaN values are left out; see metrics)."""
    out: dict = {}
    for method in evaluation.methods:
        rows = [r for r in evaluation.rows if r["method"] == method]
        out[method] = {}
        for col in evaluation.columns:
            vals = np.array([r.get(col, np.nan) for r in rows], float)
            vals = vals[np.isfinite(vals)]
            out[method][col] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                                "std": float(vals.std()) if len(vals) else float("nan"), "n": int(len(vals))}
        out[method]["constant_maps"] = {"count": sum(r["constant_map"] for r in rows), "of": len(rows)}
        if "pointing_game" in evaluation.columns:  # TorchRay's figure: the mean of per-class accuracies
            per_class: dict[int, list] = {}
            for r in rows:
                per_class.setdefault(r["target"], []).append(r["pointing_game"])
            out[method]["pointing_game_class_mean"] = {
                "mean": float(np.mean([np.mean(v) for v in per_class.values()])), "classes": len(per_class)}
    return out


def settings_lines(evaluation: Evaluation) -> list[str]:
    """What a reader needs to compare numbers: the variant and parameters of every metric shown."""
    s = evaluation.settings
    lines = []
    if {"deletion", "insertion"} & set(evaluation.metrics):
        lines.append(f"deletion/insertion: {s.step} pixels per step, baselines deletion={s.deletion_baseline} "
                     f"insertion={s.insertion_baseline} (blur: Gaussian 11x11, sigma 5, of the normalised input); "
                     "softmax probability of the explained class; AUC by the trapezoid rule over the share of "
                     "pixels changed")
    if {"average-drop", "increase-confidence"} & set(evaluation.metrics):
        rc = s.ad_variant == "relevance-cam"
        keep = s.ad_keep if s.ad_keep is not None else (0.5 if rc else None)
        space = s.ad_space or ("pixel" if rc else "input")
        lines.append(f"AD/IC: {s.ad_variant} variant, softmax probabilities, map: positive part min-max normalised"
                     + (f", top {keep:.0%} of pixels kept" if keep else ", whole map")
                     + (", weighting the image pixels then normalising" if space == "pixel"
                        else ", weighting the normalised input tensor")
                     + ("; AD averaged over the images whose confidence drops, IC counts ties as increases"
                        if rc else "; AD and IC averaged over all images"))
    if "pointing-game" in evaluation.metrics:
        lines.append(f"pointing game: map maximum within {s.tolerance:g} input pixels of a box/mask of the explained "
                     "class (all objects when none has that class); mean over images, not per class")
    if "energy-pointing-game" in evaluation.metrics:
        lines.append("energy pointing game: share of the map (positive part, min-max normalised) inside the boxes/mask")
    if "localization" in evaluation.metrics:
        lines.append(f"localization: map (positive part) min-max normalised, thresholded at {s.threshold:g}, "
                     "box of the largest connected component, best IoU with a ground-truth box; accuracy = IoU >= 0.5")
    if any(m.startswith("sanity") for m in evaluation.metrics):
        lines.append(f"sanity: weights replaced from the top by N(0, std(W)) noise (seed {s.seed}); Spearman rank "
                     "correlation and SSIM (Gaussian window, sigma 1.5) of |map| with the original; cascade = all "
                     "layers random, independent = mean over single layers; lower means the method depends "
                     "on the weights")
    return lines
