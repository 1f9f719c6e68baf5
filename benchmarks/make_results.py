"""Generate docs/results.md: every method scored by every metric on the shared models and photos.

    python benchmarks/make_results.py [--out docs/results.md] [--methods gradcam,lrp] [--step 1792]

Needs ../shared (real models and ImageNet validation photos with official boxes); without it the script
says so and exits 0, writing nothing. Per run it also writes metrics.csv, metrics.json and the curve and
sanity plots under docs/results/<run>/, which the page links to.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

LOCALIZATION = ["pointing-game", "energy-pointing-game", "localization"]
FAITHFULNESS = ["deletion", "insertion", "average-drop", "increase-confidence"]
# The imagenet_val files are already 224x224 (resized without keeping the aspect ratio): feed them as they
# are, so their boxes map 1:1 (../shared/README.md, "Preprocessing").
RUNS = [
    {"name": "squeezenet1_1-imagenet_val", "model": "squeezenet1_1.onnx", "images": "imagenet_val",
     "resize": 224, "crop": 224, "target": "gt"},
    {"name": "efficientnet_lite0-imagenet_val", "model": "efficientnet_lite0.onnx", "images": "imagenet_val",
     "resize": 224, "crop": 224, "target": "gt"},
]
SANITY = {"model": "squeezenet1_1.onnx", "images": "imagenet_val", "methods": ["gradient", "guided-backprop",
                                                                               "gradcam", "lrp"],
          "count": 2, "steps": 9}
# per-method costs kept moderate for a page regenerated on a laptop; recorded in the page. Images are explained
# two at a time: Score-CAM holds (images x channels x H x W) masks, 17 GB for ten EfficientNet images.
OPTIONS = {"smoothgrad": {"n": 10}, "integrated-gradients": {"steps": 16}}


def _progress(label: str, total: int):
    done = [0]
    start = time.perf_counter()

    def update(n):
        done[0] += n
        print(f"\r{label}: {done[0]}/{total} ({time.perf_counter() - start:.0f} s)", end="", file=sys.stderr,
              flush=True)
    return update


def _evaluate(run: dict, methods: list[str], metrics: list[str], settings_kw: dict):
    from onnx_saliency import Explainer
    from onnx_saliency.evaluation.annotations import load_annotations
    from onnx_saliency.evaluation import Settings, evaluate, sanity_step_count

    folder = SHARED / "images" / run["images"]
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:run.get("count")]
    ann_path = folder / "annotations.json"
    ex = Explainer(SHARED / "models" / run["model"], resize=run["resize"], crop=run["crop"], threads=2,
                   labels=SHARED / "labels" / "imagenet_classes.txt")
    evaluations = []
    for method in methods:  # one method at a time: a failing method is reported, not fatal
        settings = Settings(target=run["target"], options=dict(OPTIONS.get(method, {})), **settings_kw)
        total = len(images) + sanity_step_count(ex, settings, metrics)
        try:
            evaluations.append(evaluate(ex, images, [method], metrics, load_annotations(ann_path), ann_path, settings,
                                        progress=_progress(f"{run['name']} {method}", total)))
        except Exception as err:  # noqa: BLE001 - the page lists what failed and why
            print(f"\n{run['name']} {method}: FAILED {type(err).__name__}: {err}", file=sys.stderr)
            evaluations.append((method, f"{type(err).__name__}: {err}"))
        print(file=sys.stderr)
    return ex, images, evaluations


def _merge(evaluations):
    """One Evaluation holding every method that ran (they share model, images and settings)."""
    ok = [e for e in evaluations if not isinstance(e, tuple)]
    first = ok[0]
    for e in ok[1:]:
        first.methods += e.methods
        first.rows += e.rows
        first.curves.update(e.curves)
        first.sanity.update(e.sanity)
        first.sanity_display = first.sanity_display if first.sanity_display is not None else e.sanity_display
    first.settings.options = {}
    return first, [e for e in evaluations if isinstance(e, tuple)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    p.add_argument("--step", type=int, default=1792, help="pixels per deletion/insertion step")
    args = p.parse_args()
    if not (SHARED / "models").is_dir():
        print(f"skipped: needs the shared models and photos folder {SHARED}; nothing written")
        return

    from onnx_saliency.evaluation.output import markdown_table, write_evaluation
    from onnx_saliency.evaluation import settings_lines
    from onnx_saliency.methods import method_names

    methods = args.methods.split(",") if args.methods else method_names()
    out = Path(args.out)
    assets = out.parent / "results"
    start = time.perf_counter()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = ["# Results: every method on the shared models and photos", "",
             f"Generated by `python benchmarks/make_results.py --step {args.step}` on "
             f"{datetime.datetime.now().isoformat(timespec='minutes')} ({cpu}, {os.cpu_count()} cores, 2 onnxruntime "
             f"threads; onnx-saliency {version('onnx-saliency')}, onnxruntime {version('onnxruntime')}). "
             "Do not edit by hand: rerun the script.", "",
             "Metric definitions: ../shared/docs/methods-spec.md §7 and `onnx_saliency/evaluation/metrics.py`. Per-image values, "
             "curves and plots of each run are in `docs/results/<run>/`. Arrows: ↓ lower is better, ↑ higher is "
             "better. Ten images are few: read differences smaller than the ± (one standard deviation over images) "
             "as noise.", ""]
    for run in RUNS:
        ex, images, evaluations = _evaluate(run, methods, FAITHFULNESS + LOCALIZATION,
                                            {"step": args.step, "metric_batch_size": 64, "batch_size": 2})
        evaluation, failed = _merge(evaluations)
        write_evaluation(evaluation, assets / run["name"])
        pre = ex.preprocessing
        lines += [f"## {run['model'].removesuffix('.onnx')} on `{run['images']}` ({len(images)} images)", "",
                  f"- model: `shared/models/{run['model']}` (sha256 `{ex.model.sha256[:16]}…`), explained tensor "
                  f"`{ex.model.score_tensor}`; CAM layer: `{ex.resolve_layer('auto')}` (auto)",
                  f"- images: `shared/images/{run['images']}/`, official ILSVRC boxes from its annotations.json; "
                  f"target: the annotated class (`--target gt`), boxes of that class",
                  f"- preprocessing: preset {pre.preset}, resize {pre.resize} ({pre.resize_mode}), crop {pre.crop} "
                  "(the files are already 224x224)",
                  "- method options: defaults, except " + ", ".join(f"{m} {o}" for m, o in OPTIONS.items()), ""]
        lines += [f"- {line}" for line in settings_lines(evaluation)] + ["", markdown_table(evaluation), ""]
        lines += [f"- {m}: failed ({why})" for m, why in failed] + ([""] if failed else [])
        lines += [f"![deletion curves](results/{run['name']}/deletion_curves.png)",
                  f"![insertion curves](results/{run['name']}/insertion_curves.png)", ""]

    sanity_run = {"name": "sanity-squeezenet1_1", "model": SANITY["model"], "images": SANITY["images"],
                  "resize": 224, "crop": 224, "target": "gt", "count": SANITY["count"]}
    ex, images, evaluations = _evaluate(sanity_run, [m for m in SANITY["methods"] if m in methods],
                                        ["sanity-cascading"], {"sanity_steps": SANITY["steps"], "batch_size": 2})
    evaluation, failed = _merge(evaluations)
    write_evaluation(evaluation, assets / sanity_run["name"])
    lines += ["## Sanity check: cascading randomisation on squeezenet1_1", "",
              f"Images: the first {len(images)} of `shared/images/imagenet_val/` "
              f"({', '.join(p.name for p in images)}), annotated class. "
              f"{SANITY['steps']} steps spread from the top layer (conv25) down to every layer random.", ""]
    lines += [f"- {line}" for line in settings_lines(evaluation)] + [""]
    lines += ["| method | " + " | ".join(f"top {k}" for k in next(iter(evaluation.sanity.values()))["cascading"].steps)
              + " |", "| --- |" + " ---: |" * len(next(iter(evaluation.sanity.values()))["cascading"].steps)]
    import numpy as np

    for method, modes in evaluation.sanity.items():
        r = modes["cascading"]
        cells = [f"{np.nanmean(r.spearman[k]):.2f} / {r.ssim[k].mean():.2f}" for k in range(len(r.steps))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean Spearman rank correlation / mean SSIM with the original maps (NaN where a "
              "randomised map is constant: nothing to rank).", ""]
    lines += [f"- {m}: failed ({why})" for m, why in failed]
    for method in evaluation.sanity:
        safe = "".join(ch if ch.isalnum() or ch in "-_+" else "_" for ch in method)
        lines.append(f"![{method} cascade](results/{sanity_run['name']}/sanity_{safe}_cascading.png)")
    lines += ["", f"Total wall time {time.perf_counter() - start:.0f} s; load average {load_before} before, "
              + " ".join(f"{v:.2f}" for v in os.getloadavg()) + " after (shared machine).", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
