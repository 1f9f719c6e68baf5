"""Per-image cost of the seed methods on CPU, relative to one bare onnxruntime forward.

    python benchmarks/bench_seeds.py [--repeats 10] [--out benchmarks/results_seeds.md] [--shared ../shared]

ResNet-50 with random weights (torch.manual_seed(0)), legacy exporter, opset 17, dynamic batch; one 1x3x224x224
input, target class 7, 2 threads (Explainer(threads=2), ORT intra_op 2, inter_op 1). For every method the bare
forward and the method are called in turn after 2 warm-up pairs, so a change in machine load hits both alike;
the report gives medians (min-max), median / forward median and the median of the per-pair ratios.
sr-map is split into its LRP pass and its context-aware saliency step, and is also timed on EfficientNet-Lite0
with one real photo from ../shared (skipped when absent). Takes about 5-10 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    export, image, loadavg, machine_info, med, ort_session,
    peak_rss_mb, timeit, torchvision_model,
)

THREADS, SIZE, TARGET = 2, 224, 7
ROOT = Path(__file__).resolve().parent.parent
LAYER_FRAGMENT = "/layer4/layer4.2/relu"   # ResNet-50 layer4[-1] output, the usual CAM layer
# method -> target of the issue (x forward, or seconds per image); None: no target, shown for reference
METHODS = {"gradcam": None, "relevance-cam": ("x", 3), "guidance-cam": ("x", 3), "tsgb": ("x", 3),
           "gradcam+ge": ("x", 3), "cmwp+ge": ("x", 3), "contrastive-excitation-backprop": None,
           "excitation-backprop": None, "sr-map": ("s", 1.0)}
PACKAGES = ["torch", "torchvision", "onnxruntime", "onnx", "numpy", "opencv-python-headless", "onnx-saliency"]
PHOTO = "images/imagenet_val/ILSVRC2012_val_00039905.jpg"


def sr_parts(ex, x: np.ndarray, target: int):
    """(LRP pass, context-aware saliency step) of sr-map as two callables, with sr-map's own defaults."""
    from onnx_saliency import lrp as L
    from onnx_saliency.methods.context_saliency import context_aware_saliency
    from onnx_saliency.methods.sr_map import heatmap_image

    comp = L.resolve_composite(ex.engine, "sr-reference", None, None, None)
    targets = np.array([target], np.int64)
    name = ex.model.input_name
    lrp = lambda: L.relevance_at(ex.engine, x, targets, composite=comp, init="logit")  # noqa: E731
    bgr = ex.preprocessing.spec.channel_order == "BGR"
    heat = heatmap_image(lrp()["relevance"][name][0], "rgb_abs", bgr)
    cas = lambda: context_aware_saliency(heat, working_size=250, grid=48)  # noqa: E731
    return lrp, cas


def kernel_profile(graph, feeds: dict, runs: int = 3) -> tuple[float, dict]:
    """(total kernel ms per run, {op type: ms per run}) from onnxruntime's profiler, warm-up run excluded.
    Grouped by op type, not by node: onnxruntime fuses and renames nodes (Conv+Relu, layout reorders)."""
    import json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "bench_seeds_profile")
    from graph_passes._graph import materialize  # loaded models keep their weights in a store, not the proto

    sess = ort.InferenceSession(materialize(graph).SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    for _ in range(runs + 1):
        sess.run(None, feeds)
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    by_op: dict = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and len(starts) > 1 and e["ts"] >= starts[1]:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3 / runs
    return sum(by_op.values()), by_op


def cas_profile(cas, runs: int = 3) -> list[tuple[str, float]]:
    """cProfile of the context-aware saliency step: (function, share of its time), own time, largest first."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(runs):
        cas()
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    named = [(f"{Path(k[0]).name}:{k[2]}" if k[0] != "~" else k[2], v[2] / total) for k, v in stats.items()]
    return sorted(named, key=lambda kv: -kv[1])[:4]


def lrp_profile(ex, x: np.ndarray, target: int) -> dict:
    """Kernel time of sr-map's LRP graph against the plain forward graph, and where the LRP graph spends it."""
    import graph_passes as gp
    from onnx_saliency import lrp as L
    from onnx_saliency.methods.sr_map import sr_reference

    model = ex.model
    graph = L.build_relevance_graph(model.canonical, model.score_tensor, model.num_classes, (model.input_name,),
                                    sr_reference(), "logit")
    feeds = {model.input_name: x, gp.TARGETS_INPUT: np.array([target], np.int64)}
    forward_ms, forward_ops = kernel_profile(model.canonical, feeds)
    lrp_ms, lrp_ops = kernel_profile(graph, feeds)
    return {"forward_ms": forward_ms, "lrp_ms": lrp_ms, "forward_conv_ms": forward_ops.get("Conv", 0.0),
            "ops": sorted(lrp_ops.items(), key=lambda kv: -kv[1])[:6],
            "nodes": (len(model.canonical.graph.node), len(graph.graph.node))}


def bench_resnet(repeats: int, tmp: Path, methods) -> dict:
    from onnx_saliency import Explainer

    path = tmp / "resnet50.onnx"
    export(torchvision_model("resnet50"), path, SIZE)
    x = image(SIZE)
    sess = ort_session(path, THREADS)
    forward = lambda: sess.run(None, {"input": x})  # noqa: E731
    ex = Explainer(path, preset="torchvision", threads=THREADS, optimize=True)  # per call: the steady state
    hits = [l.tensor for l in ex.layers() if LAYER_FRAGMENT in l.node]
    if not hits:
        raise SystemExit(f"no layer matching {LAYER_FRAGMENT!r} in the exported ResNet-50")
    layer = hits[-1]
    rows = []
    for method in methods:
        call = lambda m=method: ex.explain(x, method=m, layer=layer, target=TARGET)  # noqa: E731
        t0 = time.perf_counter()
        res = call()
        first_ms = (time.perf_counter() - t0) * 1e3
        fwd, ours = timeit([forward, call], repeats)
        rows.append({"method": method, "forward": fwd, "times": ours, "first_ms": first_ms,
                     "paired": statistics.median(o / f for o, f in zip(ours, fwd)),
                     "finite": bool(np.isfinite(res.maps).all()), "calls": None})
        calls_before = ex.engine.calls
        call()
        rows[-1]["calls"] = ex.engine.calls - calls_before
        print(f"resnet50 {method}: {statistics.median(ours):.0f} ms, x{rows[-1]['paired']:.2f} forward "
              f"(load {loadavg()})", flush=True)
    parts = {}
    if "sr-map" in methods:
        lrp, cas = sr_parts(ex, x, TARGET)
        fwd, lrp_t, cas_t = timeit([forward, lrp, cas], repeats)
        parts = {"forward": fwd, "lrp": lrp_t, "cas": cas_t, "profile": lrp_profile(ex, x, TARGET),
                 "cas_profile": cas_profile(cas)}
    return {"layer": layer, "rows": rows, "sr_parts": parts}


def bench_photo(shared: Path, repeats: int) -> dict | None:
    from onnx_saliency import Explainer

    model, photo = shared / "models" / "efficientnet_lite0.onnx", shared / PHOTO
    if not model.is_file() or not photo.is_file():
        return None
    ex = Explainer(model, threads=THREADS)
    x, _ = ex.prepare(photo)
    sess = ort_session(model, THREADS)
    forward = lambda: sess.run(None, {sess.get_inputs()[0].name: x})  # noqa: E731
    call = lambda: ex.explain(x, method="sr-map")  # noqa: E731
    call()
    lrp, cas = sr_parts(ex, x, int(ex.predict(x).argmax()))
    fwd, ours, lrp_t, cas_t = timeit([forward, call, lrp, cas], repeats)
    profile = lrp_profile(ex, x, int(ex.predict(x).argmax()))
    return {"photo": PHOTO, "profile": profile, "forward": fwd, "times": ours, "lrp": lrp_t, "cas": cas_t,
            "paired": statistics.median(o / f for o, f in zip(ours, fwd)), "preprocessing": ex.preprocessing}


def verdict(target, median_ms: float, forward_ms: float) -> str:
    if target is None:
        return ""
    kind, limit = target
    value = median_ms / forward_ms if kind == "x" else median_ms / 1e3
    unit = "x forward" if kind == "x" else "s"
    return f"{'meets' if value <= limit else '**misses**'} <= {limit:g} {unit}"


def profile_lines(prof: dict) -> list[str]:
    ops = ", ".join(f"{op} {ms:.0f}" for op, ms in prof["ops"])
    return ["", f"onnxruntime profiler, kernel time per run of one image: forward graph ({prof['nodes'][0]} nodes) "
                f"{prof['forward_ms']:.0f} ms, of which Conv {prof['forward_conv_ms']:.0f} ms; sr-map's LRP graph "
                f"({prof['nodes'][1]} nodes) {prof['lrp_ms']:.0f} ms = {prof['lrp_ms'] / prof['forward_ms']:.2f} x, "
                f"by op type: {ops} ms."]


def report(res: dict, photo: dict | None, info: dict, repeats: int, load: tuple, wall_s: float) -> str:
    lines = ["# Seed methods: per-image cost on CPU", "",
             "Generated by `python benchmarks/bench_seeds.py`.", "",
             f"- date: {info['date']}; CPU: {info['cpu']}; nproc {info['nproc']}; {info['mem_gib']:.0f} GiB; "
             f"Python {info['python']}",
             "- " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"- torchvision ResNet-50, random weights (torch.manual_seed(0)), legacy exporter, opset 17, dynamic "
             f"batch; one 1x3x{SIZE}x{SIZE} input (uniform random pixels, torchvision normalisation), target class "
             f"{TARGET}; CAM layer `{res['layer']}`; every method at its defaults",
             f"- {THREADS} threads (Explainer(threads={THREADS}); the bare forward: ORT intra_op {THREADS}, "
             "inter_op 1)",
             f"- median (min-max) of {repeats} calls after 2 warm-up calls; the bare forward and the method are called "
             "in turn, each method with its own forward samples; `x fwd` = method median / forward median, "
             "`paired` = median of the per-pair ratios (the robust figure under load); `first call` builds the "
             "rewritten graph and its session; `ORT calls` = session.run calls per explanation",
             f"- load average (1, 5, 15 min): {load[0]} before, {load[1]} after; total wall {wall_s:.0f} s; "
             f"peak RSS {peak_rss_mb():.0f} MiB"]
    if max(float(load[0].split()[0]), float(load[1].split()[0])) > info["nproc"]:
        lines.append("- **the machine was shared with other processes (load above nproc): absolute times are "
                     "inflated and noisy; the paired ratio is the robust figure**")
    lines += ["", "## ResNet-50", "",
              "| method | median ms | min-max ms | forward median ms | x fwd | paired | first call ms | ORT calls | "
              "target |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    gradcam = next((r for r in res["rows"] if r["method"] == "gradcam"), None)
    for r in res["rows"]:
        m, f = statistics.median(r["times"]), statistics.median(r["forward"])
        lines.append(f"| {r['method']} | {m:.0f} | {min(r['times']):.0f}-{max(r['times']):.0f} | {f:.0f} | "
                     f"{m / f:.2f} | {r['paired']:.2f} | {r['first_ms']:.0f} | {r['calls']} | "
                     f"{verdict(METHODS.get(r['method']), m, f) if r['finite'] else 'NON-FINITE MAP'} |")
    ge = next((r for r in res["rows"] if r["method"] == "gradcam+ge"), None)
    if gradcam and ge:
        lines += ["", f"Gradual extrapolation on top of its base (paired ratios): gradcam+ge {ge['paired']:.2f} - "
                      f"gradcam {gradcam['paired']:.2f} = {ge['paired'] - gradcam['paired']:+.2f} x forward."]
    p = res["sr_parts"]
    if p:
        f = statistics.median(p["forward"])
        lines += ["", f"sr-map split (timed in turn with the forward): LRP pass at the input (sr-reference composite) "
                      f"{med(p['lrp'])} ms = {statistics.median(p['lrp']) / f:.2f} x forward; context-aware "
                      f"saliency at 250 px, grid 48 {med(p['cas'])} ms (a fixed cost: it sees only the 224x224 "
                      "heatmap, whatever the model)."] + profile_lines(p["profile"])
        lines += ["", "cProfile of the context-aware saliency step (own time): " + ", ".join(
            f"`{name}` {share:.0%}" for name, share in p["cas_profile"]) + ". `_mean_nearest` holds the "
            "query x candidate matrix products and the geometric weighting 1 / (1 + c d_pos)^2 of every pair; "
            "`partition` is the selection of the K = 64 nearest of about 2,000 candidates per query (about "
            "12 million pairs over the four scales at grid 48)."]
    if photo is not None:
        f, m = statistics.median(photo["forward"]), statistics.median(photo["times"])
        pre = photo["preprocessing"]
        lines += ["", "## sr-map on a real photo (EfficientNet-Lite0)", "",
                  f"`../shared/{photo['photo']}` (500x375), preprocessing from the manifest (preset `{pre.preset}`, "
                  f"resize {pre.resize}, crop {pre.crop}), top-1 class, `../shared/models/efficientnet_lite0.onnx`; "
                  f"{repeats} calls in turn with the bare forward.", "",
                  "| what | median ms | min-max ms | x fwd |", "| --- | ---: | ---: | ---: |",
                  f"| ORT forward | {f:.0f} | {min(photo['forward']):.0f}-{max(photo['forward']):.0f} | 1.00 |",
                  f"| sr-map | {m:.0f} | {min(photo['times']):.0f}-{max(photo['times']):.0f} | {m / f:.2f} "
                  f"(paired {photo['paired']:.2f}) |",
                  f"| of which LRP pass | {statistics.median(photo['lrp']):.0f} | {min(photo['lrp']):.0f}-"
                  f"{max(photo['lrp']):.0f} | {statistics.median(photo['lrp']) / f:.2f} |",
                  f"| of which context-aware saliency | {statistics.median(photo['cas']):.0f} | "
                  f"{min(photo['cas']):.0f}-{max(photo['cas']):.0f} | |",
                  "", f"Target (issue 4): <= 1 s per 224x224 image: {verdict(('s', 1.0), m, f)}.", ""]
        lines += profile_lines(photo["profile"])
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results_seeds.md"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    start, before = time.perf_counter(), loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        res = bench_resnet(args.repeats, Path(tmp), [m.strip() for m in args.methods.split(",") if m.strip()])
    photo = bench_photo(Path(args.shared), args.repeats)
    if photo is None:
        print(f"sr-map photo timing skipped: {args.shared} has no {PHOTO} / efficientnet_lite0.onnx")
    text = report(res, photo, machine_info(PACKAGES), args.repeats, (before, loadavg()), time.perf_counter() - start)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
