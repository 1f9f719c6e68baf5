"""ViT-B/16 on CPU: onnx-saliency vs LXT (AttnLRP/CP-LRP) and pytorch-grad-cam; faithfulness of the maps.

    nice -n 15 python benchmarks/bench_vit.py [--repeats 3] [--images 6] [--step 1792] [--out benchmarks/results_vit.md]

Model: torchvision `vit_b_16` (12 blocks, width 768, 224 px, 197 tokens) with RANDOM weights (seed 0; the class
token and head re-drawn, torchvision zero-initialises them): no pretrained weights can be downloaded on this
machine. Legacy export, opset 17, dynamic batch. CPU only (no GPU is lent to this task), 2 threads everywhere.

Speed (DynamicLRP's protocol: explanations per second and peak memory for one 1x3x224x224 image, target the
top-1 class): every tool runs alone in a subprocess of this script (`--only TOOL`): build, 1 warm-up call,
`--repeats` timed calls; it/s = 1 / median; peak memory = the subprocess's peak RSS (VmHWM), so torch and
onnxruntime are each counted once. Tools: the bare forward of each runtime (ORT, torch), ours (`lrp` with
`cp-lrp` and `attnlrp`, `gradcam` at the last block's norm1, `rollout`, `gradient-rollout`), LXT 2.1 with its
torchvision ViT map (`cp_LRP`, Gradient x Input) and pytorch-grad-cam's GradCAM with the documented ViT
reshape_transform. The LRP and Grad-CAM maps of ours and the peers are compared (Pearson).

Faithfulness: deletion (zero baseline) and insertion (blur baseline) AUC of the target's softmax probability,
our own metrics (onnx_saliency.evaluation.metrics.perturbation_curves), `--step` pixels per step, on the first
`--images` shared photos, for AttnLRP, CP-LRP, rollout, gradient-rollout, Grad-CAM and a random map. With random
weights the network's "evidence" is arbitrary and its probabilities are close to uniform: the numbers show
that the metrics run end to end on a transformer and how the methods order on this network, not how they would
rank on a trained ViT.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import install_torchvision_cpu_shim, loadavg, machine_info, peak_rss_mb  # noqa: E402

THREADS, SIZE = 2, 224
TOOLS = ("ort-forward", "torch-forward", "ours-cp-lrp", "ours-attnlrp", "ours-gradcam", "ours-rollout",
         "ours-gradient-rollout", "lxt-cp-lrp", "pgc-gradcam")
PACKAGES = ["torch", "torchvision", "lxt", "grad-cam", "onnxruntime", "onnx", "numpy", "onnx-saliency"]
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def build_model():
    import torch

    install_torchvision_cpu_shim()
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.vit_b_16()
    torch.nn.init.normal_(m.heads.head.weight, std=0.02)  # zero in torchvision's init: no gradient, no relevance
    torch.nn.init.normal_(m.class_token, std=0.02)
    return m.eval()


def export(model, path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.exports import export_torch

    export_torch(model, path, SIZE, "legacy")


def pixels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    img = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.float32) / 255
    return np.ascontiguousarray(((img - mean) / std).transpose(2, 0, 1)[None], np.float32)


# --- one tool per subprocess -----------------------------------------------------------------------------------

def _lxt_cp_lrp_patch():
    """LXT's torchvision ViT map, loaded without lxt.efficient/__init__ (it imports Hugging Face model patches
    that fail on transformers 5.x; see tests/test_attnlrp.py)."""
    import importlib
    import types

    import lxt

    base = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    for pkg, path in (("lxt.efficient", base), ("lxt.efficient.models", os.path.join(base, "models"))):
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = [path]
            sys.modules[pkg] = mod
    vit_torch = importlib.import_module("lxt.efficient.models.vit_torch")
    for target, patch in vit_torch.cp_LRP.items():
        assert patch(target), target


def make_call(tool: str, onnx_path: Path, x: np.ndarray, target: int):
    """-> (call returning the map or None, description)."""
    if tool == "ort-forward":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"input": x}) and None
    if tool.startswith("ours-"):
        from onnx_saliency import Explainer

        ex = Explainer(onnx_path, preset="torchvision", threads=THREADS, optimize=True)  # per call: the steady state
        method = tool[len("ours-"):]
        if method in ("cp-lrp", "attnlrp"):
            return lambda: ex.explain(x, method="lrp", composite=method, target=target).attributions.sum(1)
        return lambda: ex.explain(x, method=method, target=target).maps
    import torch

    torch.set_num_threads(THREADS)
    model = build_model()
    xt = torch.from_numpy(x.copy())
    if tool == "torch-forward":
        def forward():
            with torch.no_grad():
                model(xt)
        return forward
    if tool == "lxt-cp-lrp":
        _lxt_cp_lrp_patch()

        def lxt_call():
            xi = xt.clone().requires_grad_(True)
            model.zero_grad()
            y = model(xi)
            y[0, target].backward()
            return (xi * xi.grad).sum(1).detach().numpy()
        return lxt_call
    if tool == "pgc-gradcam":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def reshape(t, h=14, w=14):
            return t[:, 1:, :].reshape(t.size(0), h, w, t.size(2)).transpose(2, 3).transpose(1, 2)
        cam = GradCAM(model=model, target_layers=[model.encoder.layers[-1].ln_1], reshape_transform=reshape)
        return lambda: cam(input_tensor=xt, targets=[ClassifierOutputTarget(target)])
    raise SystemExit(f"unknown tool {tool}")


def probe(args) -> None:
    x = pixels()
    t0 = time.perf_counter()
    call = make_call(args.only, Path(args.onnx), x, args.target)
    build_s = time.perf_counter() - t0
    first = call()  # warm-up (graph build for ours)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    if first is not None:
        np.save(Path(args.maps) / f"{args.only}.npy", np.asarray(first, np.float32))
    print(json.dumps({"tool": args.only, "build_s": build_s, "times_s": times, "peak_mb": peak_rss_mb()}))


def speed(onnx_path: Path, target: int, repeats: int, maps: Path) -> dict:
    out = {}
    for tool in TOOLS:
        cmd = [sys.executable, __file__, "--only", tool, "--onnx", str(onnx_path), "--target", str(target),
               "--repeats", str(repeats), "--maps", str(maps)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode or not lines:
            raise SystemExit(f"{tool} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        out[tool] = json.loads(lines[-1])
        print(f"{tool}: median {statistics.median(out[tool]['times_s']):.2f} s, peak {out[tool]['peak_mb']:.0f} MiB",
              flush=True)
    return out


# --- faithfulness --------------------------------------------------------------------------------------------

FAITH_METHODS = ("attnlrp", "cp-lrp", "rollout", "gradient-rollout", "gradcam", "random")


def faithfulness(onnx_path: Path, n_images: int, step: int, methods=FAITH_METHODS) -> dict:
    from onnx_saliency import Explainer
    from onnx_saliency.evaluation.metrics import perturbation_curves

    images = sorted((SHARED / "images" / "classic").glob("*.png")) + sorted(
        (SHARED / "images" / "aibench").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
    images = images[:n_images]
    if not images:
        raise SystemExit(f"no shared photos under {SHARED / 'images'}")
    ex = Explainer(onnx_path, preset="torchvision", threads=THREADS, optimize=True)  # per call: the steady state
    x, _ = ex.prepare([str(p) for p in images])
    scores = ex.predict(x)
    targets = scores.argmax(1)
    p = np.exp(scores - scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = {"images": [p.name for p in images], "step": step, "top1_prob": p.max(1).tolist(), "methods": {}}
    rng = np.random.default_rng(0)
    for method in methods:
        t0 = time.perf_counter()
        if method == "random":
            maps = rng.random((len(x), SIZE, SIZE)).astype(np.float32)
        elif method in ("attnlrp", "cp-lrp"):
            maps = ex.explain(x, method="lrp", composite=method, target=targets, batch_size=2).maps
        else:
            maps = ex.explain(x, method=method, target=targets, batch_size=2).maps
        curves = perturbation_curves(ex.engine, x, maps, targets, step=step, batch_size=16)
        out["methods"][method] = {"deletion": curves["deletion"].auc.tolist(),
                                  "insertion": curves["insertion"].auc.tolist(),
                                  "seconds": time.perf_counter() - t0}
        print(f"{method}: deletion {np.mean(out['methods'][method]['deletion']):.5f} insertion "
              f"{np.mean(out['methods'][method]['insertion']):.5f}", flush=True)
        print("FAITH " + json.dumps({"method": method, **out["methods"][method], "images": out["images"],
                                     "top1_prob": out["top1_prob"]}), flush=True)  # survives a later crash
    return out


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def report(info, spd, maps: Path, faith, extra) -> str:
    fwd = statistics.median(spd["ort-forward"]["times_s"])
    lines = ["# ViT-B/16 on CPU: onnx-saliency vs LXT and pytorch-grad-cam", "",
             "Written by `benchmarks/bench_vit.py` (run once, `nice -n 15`, on a 2-core machine shared with other "
             "jobs: load average {} before, {} after; wall {:.0f} s). CPU only: no GPU is lent to this task, so "
             "DynamicLRP's GPU figures (LXT 6.0 it/s, 0.96 GB) are not comparable with these.".format(
                 extra["load_before"], extra["load_after"], extra["wall_s"]), "",
             f"Machine: {info['cpu']}, {info['nproc']} cores, {info['mem_gib']:.0f} GiB; Python {info['python']}; "
             + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".", "",
             "torchvision `vit_b_16`, random weights (seed 0), legacy export, opset 17; one 1x3x224x224 image; "
             f"{THREADS} threads; each tool alone in its own process: 1 warm-up, then the timed calls.", "",
             "| tool | it/s | median s (min-max) | / ORT forward | build s | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for tool in TOOLS:
        r = spd[tool]
        ts = r["times_s"]
        med = statistics.median(ts)
        lines.append(f"| {tool} | {1 / med:.2f} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | {med / fwd:.2f} | "
                     f"{r['build_s']:.1f} | {r['peak_mb']:.0f} |")
    lines += ["", "Build: ours loads, canonicalises and checks the file (the explain graph is built at the "
              "warm-up call); the torch tools build the model.", ""]
    pairs = [("ours-cp-lrp", "lxt-cp-lrp", "CP-LRP relevance (channel sum): ours vs LXT"),
             ("ours-gradcam", "pgc-gradcam", "Grad-CAM map: ours vs pytorch-grad-cam")]
    for a, b, what in pairs:
        fa, fb = maps / f"{a}.npy", maps / f"{b}.npy"
        if fa.exists() and fb.exists():
            lines.append(f"- {what} at full depth (12 blocks): Pearson {pearson(np.load(fa), np.load(fb)):.6f}")
    if faith:
        lines += ["", "## Faithfulness (deletion / insertion AUC, our metrics)", "",
                  f"{len(faith['images'])} shared photos ({', '.join(faith['images'])}), the network's top-1 class "
                  f"as target, {faith['step']} pixels per step; deletion to zero (lower is better), insertion from "
                  "a blur (higher is better); probability = softmax of the target.", "",
                  "| method | deletion AUC (mean) | insertion AUC (mean) | insertion - deletion | s |",
                  "| --- | --- | --- | --- | --- |"]
        for m, r in faith["methods"].items():
            d, i = np.mean(r["deletion"]), np.mean(r["insertion"])
            lines.append(f"| {m} | {d:.6f} | {i:.6f} | {i - d:+.6f} | {r['seconds']:.0f} |")
        lines += ["", "Top-1 probabilities of the random-weight network on these photos: "
                  + ", ".join(f"{v:.5f}" for v in faith["top1_prob"])
                  + " (1/1000 = 0.001 is uniform). What this means: with random weights nothing in the photos is "
                  "evidence for any class, so the AUCs are tiny, differences between methods are within what "
                  "any map would give, and they do NOT rank the methods for a trained ViT. They show the metric "
                  "pipeline runs on a transformer from its ONNX file; a trained export (e.g. torchvision's "
                  "ViT_B_16_Weights) is needed for a meaningful comparison."]
    return "\n".join(lines) + "\n"


def main():
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--step", type=int, default=1792)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results_vit.md"))
    p.add_argument("--only", choices=TOOLS)
    p.add_argument("--onnx")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--maps")
    p.add_argument("--no-speed", action="store_true", help="faithfulness only (prints one JSON line per method)")
    p.add_argument("--faith-methods", default=",".join(FAITH_METHODS))
    args = p.parse_args()
    if args.only:
        return probe(args)
    start, extra = time.perf_counter(), {"load_before": loadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model()
        path = tmp / "vit_b_16.onnx"
        export(model, path)
        import torch

        with torch.no_grad():
            target = int(model(torch.from_numpy(pixels())).argmax())
        del model
        print(f"exported ({time.perf_counter() - start:.0f} s), target {target}", flush=True)
        if args.no_speed:
            faithfulness(path, args.images, args.step, tuple(args.faith_methods.split(",")))
            return
        spd = speed(path, target, args.repeats, tmp)
        print("SPEED " + json.dumps(spd), flush=True)  # survives a later crash
        faith = faithfulness(path, args.images, args.step, tuple(args.faith_methods.split(","))) if args.images else None
        extra.update(load_after=loadavg(), wall_s=time.perf_counter() - start)
        text = report(machine_info(PACKAGES), spd, tmp, faith, extra)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
