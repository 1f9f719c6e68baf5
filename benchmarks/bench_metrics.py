"""Deletion + insertion cost (CPU) for one image and one method against the floor of 2 x 224 single-image
onnxruntime forwards.

    python benchmarks/bench_metrics.py [--models squeezenet1_1,efficientnet_lite0] [--repeats 3]
                                       [--out benchmarks/results_metrics.md]

Real models and a photo from ../shared (skips when absent). 224x224 input, 224 pixels per step: 224 steps,
225 curve points per metric. Rows, called in turn so machine load hits them alike:
- floor: 448 single-image forwards of a bare onnxruntime session (no perturbation work at all);
- one at a time: RISE CausalMetric's loop (perturb, run one image, next step) on the same bare session;
- onnx-saliency: metrics.perturbation_curves (both curves, batched through the cached session).
The Grad-CAM map is computed once beforehand; its cost is reported separately.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import arguments, loadavg, machine_info, timeit  # noqa: E402

THREADS, STEP = 2, 224
SHARED = Path(__file__).resolve().parents[2] / "shared"
IMAGE = SHARED / "images" / "skimage" / "chelsea.png"


def seconds(fns, repeats: int, warmup: int = 1) -> list[list[float]]:
    """Wall-clock seconds of `repeats` calls of each fn, called in turn, after `warmup` untimed rounds."""
    return [[ms / 1e3 for ms in ts] for ts in timeit(list(fns), repeats, warmup)]


def one_at_a_time(sess, name, x, blurred, order, target):
    """RISE's CausalMetric loop for deletion and insertion: one perturbed image per session call."""
    n_steps = -(-order.size // STEP)
    aucs = []
    for start, finish in ((x, np.zeros_like(x)), (blurred, x)):
        img = start.copy()
        flat, src = img.reshape(1, 3, -1), finish.reshape(1, 3, -1)
        scores = np.empty(n_steps + 1)
        for i in range(n_steps + 1):
            logits = sess.run(None, {name: img})[0][0].astype(np.float64)
            e = np.exp(logits - logits.max())
            scores[i] = e[target] / e.sum()
            if i < n_steps:
                coords = order[STEP * i:STEP * (i + 1)]
                flat[0, :, coords] = src[0, :, coords]
        aucs.append((scores.sum() - scores[0] / 2 - scores[-1] / 2) / n_steps)
    return aucs


def bench_model(name: str, repeats: int) -> dict:
    import onnxruntime as ort

    from onnx_saliency import Explainer
    from onnx_saliency.evaluation import metrics as M

    path = SHARED / "models" / f"{name}.onnx"
    ex = Explainer(path, threads=THREADS, labels=SHARED / "labels" / "imagenet_classes.txt")
    x, _ = ex.prepare([IMAGE])
    t0 = time.perf_counter()
    result = ex.explain(x, method="gradcam")
    map_first_s = time.perf_counter() - t0
    map_s = min(seconds([lambda: ex.explain(x, method="gradcam")], 3, warmup=0)[0])
    target = int(result.targets[0])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    if ex.model.layout != "NCHW":
        raise SystemExit(f"{name}: the bare-session rows feed NCHW arrays; {ex.model.layout} is not supported")
    order = np.argsort(-result.maps[0].ravel(), kind="stable")
    blurred = M.baseline_images(x, "blur")
    n_forwards = 2 * (x.shape[2] * x.shape[3] // STEP)
    calls = {}

    def floor():
        for _ in range(n_forwards):
            sess.run(None, {feed: x})

    def ours(batch):
        def run():
            before = ex.engine.calls
            curves = M.perturbation_curves(ex.engine, x, result.maps, result.targets, step=STEP, batch_size=batch)
            calls[batch] = ex.engine.calls - before
            return curves
        return run

    fns = {"floor: 448 single-image ORT forwards": floor,
           "one image at a time (RISE loop, bare ORT)": lambda: one_at_a_time(sess, feed, x, blurred, order, target),
           "onnx-saliency, batch 64 (default)": ours(64),
           "onnx-saliency, batch 16": ours(16)}
    times = dict(zip(fns, seconds(list(fns.values()), repeats)))
    curves = ours(64)()
    loop_aucs = one_at_a_time(sess, feed, x, blurred, order, target)
    return {"times": times, "calls": calls, "map_s": map_s, "map_first_s": map_first_s,
            "target": ex.model.label(target),
            "auc": (float(curves["deletion"].auc[0]), float(curves["insertion"].auc[0])), "loop_auc": loop_aucs}


def report(results: dict, repeats: int, wall: float, load: tuple) -> str:
    info = machine_info(["onnxruntime", "onnx", "numpy", "onnx-saliency"])
    lines = ["# Deletion + insertion cost (CPU)", "",
             f"- date: {info['date']}; CPU: {info['cpu']}; nproc {info['nproc']}; Python {info['python']}; "
             + ", ".join(f"{p} {v}" for p, v in info["versions"].items()),
             f"- {THREADS} threads (ORT intra-op, inter-op 1); image `{IMAGE.relative_to(SHARED.parent)}`, "
             "224x224 input; "
             f"Grad-CAM map (auto layer, top-1); {STEP} pixels per step (224 steps, 225 points per curve); deletion "
             "baseline zero, insertion baseline blur (Gaussian 11, sigma 5); softmax probability of the top-1 class",
             f"- median (min-max) of {repeats} runs after 1 warm-up round, rows called in turn; "
             f"load average {load[0]} before, {load[1]} after (the machine is shared); total wall {wall:.0f} s", ""]
    for name, r in results.items():
        floor = statistics.median(next(iter(r["times"].values())))
        lines += [f"## {name}", "",
                  f"Grad-CAM map {r['map_s'] * 1e3:.0f} ms (first call, graph rewrite + session: "
                  f"{r['map_first_s'] * 1e3:.0f} ms), not included below. Target: {r['target']}. "
                  f"AUC deletion {r['auc'][0]:.4f}, insertion {r['auc'][1]:.4f} "
                  f"(one-at-a-time loop: {r['loop_auc'][0]:.4f}, {r['loop_auc'][1]:.4f}).", "",
                  "| what | median s | min-max s | session calls | x floor |", "| --- | ---: | ---: | ---: | ---: |"]
        for label, ts in r["times"].items():
            med = statistics.median(ts)
            batch = 64 if "64" in label else 16 if "16" in label else None
            calls = r["calls"].get(batch, "") if batch else (448 if label.startswith("floor") else 450)
            lines.append(f"| {label} | {med:.2f} | {min(ts):.2f}-{max(ts):.2f} | {calls} | {med / floor:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = arguments(__doc__, "squeezenet1_1,efficientnet_lite0", 3, "benchmarks/results_metrics.md")
    args = p.parse_args()
    if not (SHARED / "models").is_dir():
        raise SystemExit(f"skipped: needs the shared models folder {SHARED}")
    start = time.perf_counter()
    load_before = loadavg()
    results = {}
    for name in args.models.split(","):
        results[name] = bench_model(name, args.repeats)
        print(f"{name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    load_after = loadavg()
    text = report(results, args.repeats, time.perf_counter() - start, (load_before, load_after))
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
