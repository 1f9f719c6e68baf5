"""How much of the target logit LRP keeps at the input, and how its maps score on deletion/insertion, with the
layers' (BatchNorm-folded) biases kept in the rules or removed (the `-nobias` composites): the numbers behind
the default composite (docs/lrp-bias.md).

    python benchmarks/lrp_bias.py [--models efficientnet_lite0,squeezenet1_1] [--out benchmarks/results_lrp_bias.md]

Real models and photos from ../shared (exits with a message when absent). Per model and composite, over the
photos: kept = sum R(input) / logit (1 = conserved; init=logit), the share of positive pixels, deletion AUC
(zero baseline, lower is better) and insertion AUC (blur baseline, higher is better) of the summed map, both with
onnx_saliency.evaluation.metrics at 896 pixels per step (57 points). gradient-x-input and Grad-CAM are scored
alike for scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = ["darknet/dog.jpg", "darknet/eagle.jpg", "darknet/person.jpg", "skimage/chelsea.png", "skimage/coffee.png",
          "skimage/astronaut.png"]
COMPOSITES = ["epsilon-plus-flat", "epsilon-plus-flat-nobias", "epsilon-plus", "epsilon-plus-nobias",
              "epsilon-alpha2-beta1-flat", "epsilon-alpha2-beta1-flat-nobias", "epsilon-gamma-box",
              "epsilon-gamma-box-nobias"]
STEP = 896


def score(ex, x, maps, targets):
    from onnx_saliency.evaluation import metrics as M

    curves = M.perturbation_curves(ex.engine, x, maps, targets, step=STEP)
    return curves["deletion"].auc, curves["insertion"].auc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,squeezenet1_1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from onnx_saliency import Explainer
    from onnx_saliency.errors import NumericalError
    from onnx_saliency.intake.preprocess import load_image

    photos = [SHARED / "images" / p for p in PHOTOS]
    if not all(p.is_file() for p in photos):
        print(f"needs the shared photos under {SHARED / 'images'}", file=sys.stderr)
        return 2
    lines = ["| model | map | kept (mean) | kept (min .. max) | positive pixels | deletion AUC (lower better) | "
             "insertion AUC (higher better) | s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.models.split(","):
        path = SHARED / "models" / f"{name}.onnx"
        ex = Explainer(path, threads=2)
        pictures = [load_image(p) for p in photos]
        x, _ = ex.prepare(pictures)
        for method in [("lrp", c) for c in COMPOSITES] + [("gradient-x-input", None), ("gradcam", None)]:
            t0 = time.perf_counter()
            label = method[1] or method[0]
            try:
                r = ex.explain(pictures, method=method[0], **({"composite": method[1]} if method[1] else {}))
            except NumericalError as err:
                lines.append(f"| {name} | {label} | diverges | - | - | - | - | - |")
                print(f"{name} {label}: {err}", file=sys.stderr)
                continue
            if method[0] == "lrp":
                kept = r.attributions.reshape(len(x), -1).sum(1) / r.scores
                kept_txt, span = f"{kept.mean():.3g}", f"{kept.min():.3g} .. {kept.max():.3g}"
            else:
                kept_txt, span = "-", "-"
            if not np.isfinite(r.maps).all() or np.abs(r.maps).max() > 1e20:
                lines.append(f"| {name} | {label} | {kept_txt} | {span} | - | diverges | diverges | - |")
                continue
            deletion, insertion = score(ex, x, r.maps, r.targets)
            positive = float((r.maps > 0).mean())
            lines.append(f"| {name} | {label} | {kept_txt} | {span} | {positive:.2f} | {deletion.mean():.4f} | "
                         f"{insertion.mean():.4f} | {time.perf_counter() - t0:.0f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
