"""Writing an Evaluation: the method x metric table, per-image CSV and JSON, and PNG plots."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from . import plots
from .runner import COLUMN_TITLES, LOWER_IS_BETTER, Evaluation, settings_lines, summary
from ..output.sidecar import versions
from ..output.writers import write_bytes, write_json, write_png

__all__ = ["table_rows", "format_table", "markdown_table", "write_evaluation"]


def _cell(stats: dict, column: str) -> str:
    mean, std = stats["mean"], stats["std"]
    if not math.isfinite(mean):
        return "-"
    digits = 1 if column in ("average_drop", "increase_confidence", "pointing_game", "localization_correct") else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(evaluation: Evaluation) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per method, one 'mean ± std' cell per metric column."""
    table = summary(evaluation)
    header = ["method"] + [COLUMN_TITLES[c] + (" ↓" if c in LOWER_IS_BETTER else " ↑") for c in evaluation.columns]
    header.append("constant maps")
    rows = []
    for method in evaluation.methods:
        stats = table[method]
        rows.append([method] + [_cell(stats[c], c) for c in evaluation.columns]
                    + [f"{stats['constant_maps']['count']}/{stats['constant_maps']['of']}"])
    return header, rows


def format_table(evaluation: Evaluation) -> str:
    header, rows = table_rows(evaluation)
    widths = [max(len(r[k]) for r in [header] + rows) for k in range(len(header))]
    lines = ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(evaluation: Evaluation) -> str:
    header, rows = table_rows(evaluation)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _csv(evaluation: Evaluation) -> bytes:
    fields = ["image", "method", "target", "label", "score", "constant_map"]
    if any("annotated_class_matched" in r for r in evaluation.rows):
        fields.append("annotated_class_matched")
    fields += evaluation.columns
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in evaluation.rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return buf.getvalue().encode("utf-8")


def _finite(v):
    """JSON has no NaN: undefined values (e.g. Relevance-CAM AD of an image that did not drop) become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _json(evaluation: Evaluation) -> dict:
    curves = {}
    for method, kinds in evaluation.curves.items():
        curves[method] = {kind: {"step": c.step, "baseline": c.baseline, "fractions": c.fractions.tolist(),
                                 "mean": c.probabilities.mean(axis=0).tolist(),
                                 "per_image": {img: p.tolist() for img, p in zip(evaluation.images, c.probabilities)}}
                          for kind, c in kinds.items()}
    sanity = {}
    for method, modes in evaluation.sanity.items():
        sanity[method] = {mode: {"layers_from_top": r.layers, "steps": r.steps, "step_labels": r.step_labels(),
                                 "absolute": r.absolute, "seed": r.seed,
                                 "spearman": r.spearman.tolist(), "ssim": r.ssim.tolist(),
                                 "spearman_mean": np.nanmean(r.spearman, axis=1).tolist() if r.spearman.size else [],
                                 "ssim_mean": r.ssim.mean(axis=1).tolist()}
                          for mode, r in modes.items()}
    return _finite({
        "model": evaluation.model, "model_sha256": evaluation.model_sha256, "images": evaluation.images,
        "methods": evaluation.methods, "metrics": evaluation.metrics, "settings": evaluation.settings.describe(),
        "preprocessing": evaluation.preprocessing, "assumptions": evaluation.assumptions,
        "notes": settings_lines(evaluation),
        "summary": summary(evaluation), "per_image": evaluation.rows, "curves": curves, "sanity": sanity,
        "failed": evaluation.failed, "skipped": evaluation.skipped, "versions": versions(),
    })


def curve_plot(evaluation: Evaluation, kind: str) -> np.ndarray:
    series, bands = {}, {}
    for method, kinds in evaluation.curves.items():
        c = kinds.get(kind)
        if c is None:
            continue
        mean, std = c.probabilities.mean(axis=0), c.probabilities.std(axis=0)
        series[f"{method} (AUC {c.auc.mean():.3f})"] = (c.fractions, mean)
        bands[f"{method} (AUC {c.auc.mean():.3f})"] = (c.fractions, mean - std, mean + std)
    any_curve = next(k[kind] for k in evaluation.curves.values() if kind in k)
    title = (f"{kind}: mean over {len(evaluation.images)} image(s), {any_curve.step} px/step, "
             f"baseline {any_curve.baseline}")
    return plots.line_chart(series, title, "share of pixels " + ("removed" if kind == "deletion" else "inserted"),
                            "probability", x_range=(0, 1), y_range=(0, 1), bands=bands)


def sanity_plot(evaluation: Evaluation, method: str, mode: str) -> np.ndarray:
    r = evaluation.sanity[method][mode]
    xs = np.arange(len(r.steps), dtype=float)
    chart = plots.line_chart(
        {"Spearman rank corr. (mean)": (xs, np.nanmean(r.spearman, axis=1)), "SSIM (mean)": (xs, r.ssim.mean(axis=1))},
        f"{method}: {mode} randomisation ({len(r.targets)} image(s), |map|)",
        "top layers randomised" if mode == "cascading" else "layer randomised alone (from the top)",
        "similarity to original", y_range=(-0.2, 1.05), size=(360, 760),
        x_ticks=[(float(k), str(s) if mode == "cascading" else str(k)) for k, s in enumerate(r.steps)]
        if len(r.steps) <= 30 else None)
    rows = []
    if r.maps is not None:
        labels = r.step_labels()
        shown = np.abs if r.absolute else np.asarray  # show what was compared
        tiles = [shown(r.original[0])] + [shown(m[0]) for m in r.maps]
        names = ["original"] + labels
        per_row = 9
        for k in range(0, len(tiles), per_row):
            rows.append(plots.map_strip(tiles[k:k + per_row], names[k:k + per_row], tile=96,
                                        display=evaluation.sanity_display if k == 0 else None))
    return plots.stack_vertical(rows + [chart])


def write_evaluation(evaluation: Evaluation, out: Path) -> list[Path]:
    """metrics.csv, metrics.json, <kind>_curves.png, sanity_<method>_<mode>.png under `out`."""
    out = Path(out)
    written = [write_bytes(out / "metrics.csv", _csv(evaluation)), write_json(out / "metrics.json", _json(evaluation))]
    for kind in ("deletion", "insertion"):
        if any(kind in k for k in evaluation.curves.values()):
            written.append(write_png(out / f"{kind}_curves.png", curve_plot(evaluation, kind)))
    for method, modes in evaluation.sanity.items():
        for mode in modes:
            safe = "".join(ch if ch.isalnum() or ch in "-_+" else "_" for ch in method)
            written.append(write_png(out / f"sanity_{safe}_{mode}.png", sanity_plot(evaluation, method, mode)))
    return written
