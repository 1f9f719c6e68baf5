"""Pointing game of the seed methods and Grad-CAM on EfficientNet-Lite0, on the shared ImageNet val photos.

    python benchmarks/pointing_game.py [--shared ../shared] [--out docs/pointing_game.md] [--tolerance 15]

Explains the ground-truth class (annotations.json `class_index`) of each photo in
../shared/images/imagenet_val and counts the images whose map maximum falls inside a ground-truth box
(strict) or within `--tolerance` input pixels of one (TorchRay's variant). Skips with a message, exit status
0, when the shared folder is absent. Takes about 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from onnx_saliency import Explainer
from onnx_saliency.evaluation import metrics as M
from onnx_saliency.evaluation.annotations import load_annotations
from onnx_saliency.methods.gradual import downsampling_excitations
from onnx_saliency.intake.preprocess import load_image, prepare

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("gradcam", "relevance-cam", "guidance-cam", "gradcam+ge", "cmwp+ge", "contrastive-excitation-backprop",
           "excitation-backprop", "tsgb", "sr-map")
# option variants shown below the defaults: GE as the authors' code (v1) and its 2023 revision (v2); the GE
# settings one by one are in benchmarks/ge_defaults.py
VARIANTS = (("gradcam+ge", {"reference": "v1"}), ("cmwp+ge", {"reference": "v1"}),
            ("gradcam+ge", {"reference": "v2"}))
MODEL = "models/efficientnet_lite0.onnx"
IMAGES = "images/imagenet_val"
THREADS = 2


def inputs(explainer: Explainer, folder: Path, annotations: dict):
    """Per image: the model input, its preprocessing and the ground-truth regions in input pixels.

    Files that already have the model's input size go in as they are (resize off; the crop then takes the
    whole image), as the shared README advises; any other file (the 500x375 tench) gets the model's own
    resize + centre crop. Boxes go through the same geometry (annotations.ImageAnnotation.regions).
    """
    base = explainer.preprocessing
    crop = base.crop
    rows = []
    for name in sorted(annotations):
        ann = annotations[name]
        picture = load_image(folder / name)
        h, w = picture.shape[:2]
        pre = base.with_overrides(resize_mode="none") if (h, w) == (crop, crop) else base
        x, _ = prepare([picture], pre)
        target = ann.classes[0]
        rows.append({"name": name, "x": x, "pre": pre, "target": target, "size": (w, h),
                     "regions": ann.regions(target, (h, w), pre), "class_name": explainer.model.label(target)})
    return rows


def centre_hits(regions, tolerance: float) -> np.ndarray:
    """The centre-pointing baseline: a map whose maximum is the centre pixel."""
    hw = regions[0].hw
    maps = np.zeros((len(regions), *hw), np.float32)
    maps[:, hw[0] // 2, hw[1] // 2] = 1
    return M.pointing_game(maps, regions, tolerance)


def run(shared: Path, tolerance: float, methods) -> dict:
    """`methods`: (method name, options) pairs."""
    explainer = Explainer(shared / MODEL, threads=THREADS, labels=shared / "labels" / "imagenet_classes.txt")
    annotations = load_annotations(shared / IMAGES / "annotations.json")
    rows = inputs(explainer, shared / IMAGES, annotations)
    x = np.concatenate([r["x"] for r in rows])
    targets = np.array([r["target"] for r in rows], np.int64)
    regions = [r["regions"] for r in rows]
    logits = explainer.engine.forward(x)[explainer.model.score_tensor]
    top1 = logits.argmax(axis=1)
    results = {}
    for method, options in methods:
        t0 = time.perf_counter()
        res = explainer.explain(x, method=method, target=targets, batch_size=len(x), **options)
        seconds = time.perf_counter() - t0
        if not np.array_equal(np.asarray(res.targets), targets):
            raise SystemExit(f"{method}: explained {res.targets} instead of the ground truth {targets}")
        peaks = [np.unravel_index(int(np.argmax(m)), m.shape) for m in res.maps]
        key = method + "".join(f", {k}={v}" for k, v in options.items())
        results[key] = {"strict": M.pointing_game(res.maps, regions, 0.0),
                        "tolerant": M.pointing_game(res.maps, regions, tolerance),
                        "constant": M.constant_maps(res.maps),
                        "nonpositive": res.maps.reshape(len(x), -1).max(axis=1) <= 0,
                        "negative_sum": res.maps.reshape(len(x), -1).sum(axis=1) < 0, "peaks": peaks,
                        "seconds": seconds,
                        "layers": res.layers, "options": res.options}
        print(f"{key}: strict {results[key]['strict'].mean():.0%}, +{tolerance:g} px "
              f"{results[key]['tolerant'].mean():.0%} ({seconds:.1f} s)", flush=True)
    return {"explainer": explainer, "rows": rows, "top1": top1, "results": results,
            "centre": {"strict": centre_hits(regions, 0.0), "tolerant": centre_hits(regions, tolerance)}}


def box_share(regions) -> float:
    """Mean share of the input covered by the ground-truth boxes: the hit rate of a uniformly random point."""
    return float(np.mean([r.union_mask().mean() for r in regions]))


def report(out: dict, tolerance: float, shared_arg: str, elapsed: float) -> str:
    ex, rows, results = out["explainer"], out["rows"], out["results"]
    n = len(rows)
    correct = int(sum(int(t) == r["target"] for t, r in zip(out["top1"], rows)))
    as_is = [r["name"] for r in rows if r["pre"].resize_mode == "none"]
    resized = [r for r in rows if r["pre"].resize_mode != "none"]
    pre = ex.preprocessing
    layer = ex.resolve_layer("auto")
    lines = [
        "# Pointing game: seed methods and Grad-CAM on EfficientNet-Lite0", "",
        "Generated by `benchmarks/pointing_game.py`; regenerate with", "",
        f"    python benchmarks/pointing_game.py --shared {shared_arg}", "",
        "- **model**: `../shared/models/efficientnet_lite0.onnx` (ImageNet-1k, BN folded; "
        f"sha256 `{ex.model.sha256[:16]}...`), onnxruntime CPU, {THREADS} threads",
        f"- **images**: the {n} ImageNet ILSVRC2012 validation photos of `../shared/images/imagenet_val` with their "
        "official boxes (`annotations.json`, from clovaai/wsolevaluation); EfficientNet-Lite0 top-1 is correct "
        f"on {correct}/{n} of them with this preprocessing",
        f"- **preprocessing**: preset `{pre.preset}` (`(pixel - 127) / 128`, RGB, NCHW) from the model manifest. "
        f"The {len(as_is)} files that are already {pre.crop}x{pre.crop} (Score-CAM copies, resized without "
        "keeping the aspect) are fed as they are, no resize and no crop, so `boxes_in_file` map 1:1 to the "
        "input; " + ", ".join(f"`{r['name']}` ({r['size'][0]}x{r['size'][1]})" for r in resized)
        + f" gets the model's own resize (shorter side {pre.resize}) + centre crop {pre.crop}, and its "
        "boxes go through the same geometry (`onnx_saliency.evaluation.annotations`, `ImageAnnotation.regions`)",
        "- **target**: the ground-truth class (`class_index`) of every image, whatever the model predicts; "
        "the boxes are those of that class",
        f"- **settings**: every method at its defaults (listed under the tables); CAM-family methods at the "
        f"auto layer `{layer}` (the manifest's default layer); maps at input resolution (224x224), pixel-level "
        "maps (tsgb, excitation-backprop, sr-map) not smoothed; the seconds column includes building each "
        "method's rewritten graph and its onnxruntime session (first call)",
        "- **pointing game**: the map's first maximum (argmax, row-major), as a pixel centre; **strict** = "
        "inside a ground-truth box of the image, **tolerant** = within "
        f"{tolerance:g} input pixels of one (TorchRay's pointing game); a constant map counts as a miss; "
        "`onnx_saliency.evaluation.metrics.pointing_game`",
        f"- **baselines**: always pointing at the centre pixel; a uniformly random point hits a box with "
        f"probability {box_share([r['regions'] for r in rows]):.0%} on average (the boxes are large: "
        "ImageNet objects fill most of these photos)",
        f"- {n} images only: one image is 10 points; differences of one or two images are noise", "",
        "| method | strict hits | strict % | +{:g} px hits | +{:g} px % | constant maps | maps with max <= 0 | "
        "s for {} images |".format(tolerance, tolerance, n),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, r in results.items():
        s, t = r["strict"], r["tolerant"]
        lines.append(f"| {method} | {int(s.sum())}/{n} | {s.mean():.0%} | {int(t.sum())}/{n} | {t.mean():.0%} | "
                     f"{int(r['constant'].sum())} | {int(r['nonpositive'].sum())} | {r['seconds']:.1f} |")
    c = out["centre"]
    lines += [f"| *centre baseline* | {int(c['strict'].sum())}/{n} | {c['strict'].mean():.0%} | "
              f"{int(c['tolerant'].sum())}/{n} | {c['tolerant'].mean():.0%} | | | |", "",
              "## Per image", "",
              "S = strict hit, T = hit only with the tolerance, . = miss; the map maximum as (x, y) in input "
              "pixels in the second table.", "",
              "| image | class | top-1 | " + " | ".join(results) + " |",
              "| --- | --- | --- |" + " :---: |" * len(results)]
    for i, row in enumerate(rows):
        top = int(out["top1"][i])
        pred = "ok" if top == row["target"] else ex.model.label(top)
        marks = ["S" if r["strict"][i] else ("T" if r["tolerant"][i] else ".") for r in results.values()]
        lines.append(f"| `{row['name']}` | {row['class_name']} ({row['target']}) | {pred} | "
                     + " | ".join(marks) + " |")
    lines += ["", "| image | boxes (x0, y0, x1, y1), input px | " + " | ".join(results) + " |",
              "| --- | --- |" + " ---: |" * len(results)]
    for i, row in enumerate(rows):
        boxes = "; ".join(f"{b[0]:.0f},{b[1]:.0f},{b[2]:.0f},{b[3]:.0f}" for b in row["regions"].boxes)
        peaks = [f"{int(r['peaks'][i][1])},{int(r['peaks'][i][0])}" for r in results.values()]
        lines.append(f"| `{row['name']}` | {boxes} | " + " | ".join(peaks) + " |")
    lines += ["", "## Settings each method reported", ""]
    for method, r in results.items():
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(f"- {method}: layers {', '.join(f'`{t}`' for t in r['layers']) or '(input)'}"
                     + (f"; options {opts}" if opts else ""))
    lines += ["", "## Observations", ""]
    tsgb = results.get("tsgb")
    if tsgb is not None and tsgb["nonpositive"].any():
        lines.append(f"- tsgb: the signed map S = sum_c x * g-hat has no positive value on "
                     f"{int(tsgb['nonpositive'].sum())}/{n} images and a negative sum on "
                     f"{int(tsgb['negative_sum'].sum())}/{n}; where it has no positive value its maximum is the "
                     "least negative pixel, and the reference's display max(S, 0) / max|S| would be blank.")
    if any(k.startswith(("gradcam+ge", "cmwp+ge")) for k in results):
        names = downsampling_excitations(ex.model, [layer])
        lines.append("- gradual extrapolation multiplies by the channel sums of " + ", ".join(f"`{t}`" for t in names)
                     + ": on this network the down-sampling nodes are strided (depthwise) convolutions, whose "
                     "outputs are taken before their Clip, so the factors are signed, unlike the post-ReLU "
                     "max-pool outputs of the VGG the method was designed on.")
    c = out["centre"]
    lines.append(f"- the centre baseline scores {c['strict'].mean():.0%} strict / {c['tolerant'].mean():.0%} "
                 "tolerant: the objects of these photos mostly cover the centre, so the pointing game separates "
                 "the methods only weakly; compare each method with the baseline, not with 0.")
    lines += ["", f"Total wall time {elapsed:.0f} s."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared data folder (default ../shared)")
    p.add_argument("--out", default=str(ROOT / "docs" / "pointing_game.md"))
    p.add_argument("--tolerance", type=float, default=15.0)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names, default options")
    p.add_argument("--no-variants", action="store_true", help="leave out the option-variant rows")
    args = p.parse_args()
    shared = Path(args.shared)
    if not (shared / MODEL).is_file() or not (shared / IMAGES / "annotations.json").is_file():
        print(f"skipped: {shared} has no {MODEL} and {IMAGES}/annotations.json (the shared data folder is absent)")
        return 0
    start = time.perf_counter()
    methods = [(m.strip(), {}) for m in args.methods.split(",") if m.strip()]
    if not args.no_variants:
        methods += [(m, o) for m, o in VARIANTS if any(m == name for name, _ in methods)]
    out = run(shared, args.tolerance, methods)
    text = report(out, args.tolerance, args.shared if args.shared != str(ROOT.parent / "shared") else "../shared",
                  time.perf_counter() - start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
