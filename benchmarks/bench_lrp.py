"""LRP latency and memory on CPU: onnx-saliency vs zennit and the bare ORT forward.

    python benchmarks/bench_lrp.py [--models resnet50,vgg16] [--repeats 10] [--out benchmarks/results_lrp.md]

EpsilonPlusFlat relevance at the input, initial relevance one-hot x logit, on random-weight torchvision models
(seed 0, legacy export, opset 17, dynamic batch), one 1x3x224x224 input, the model's top-1 class as target,
2 threads everywhere. Medians (min-max) after 2 warm-up calls; ORT and ours are called in turn.
zennit (with ResNetCanonizer / VGGCanonizer) is timed twice: hooks attached once (`attributor(x, init)` inside
one entered context) and attach + run + detach per call. Peak memory: each tool runs alone in a subprocess of this
script (`--only ort|ours|zennit`), which reports its peak RSS (VmHWM) after build, warm-up and 3 calls (ort and ours never
import torch). Also checks the relevance: sum R / logit for both libraries and the Pearson of the two maps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import export, loadavg, machine_info, med, peak_rss_mb, rss_mb, timeit, torchvision_model  # noqa: E402

THREADS, SIZE = 2, 224
CANONIZERS = {"resnet50": "ResNetCanonizer", "vgg16": "VGGCanonizer"}
PACKAGES = ["torch", "torchvision", "zennit", "onnxruntime", "onnx", "numpy", "onnx-saliency"]


def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    img = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.float32) / 255
    return np.ascontiguousarray(((img - mean) / std).transpose(2, 0, 1)[None], np.float32)


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ours_call(path: Path, x: np.ndarray, target: int):
    from onnx_saliency import Explainer

    ex = Explainer(path, preset="torchvision", threads=THREADS)
    return lambda: ex.explain(x, method="lrp", target=target, composite="epsilon-plus-flat")


def zennit_parts(model, name: str, x: np.ndarray, target: int):
    """(attributor factory, input tensor, initial relevance fn): one-hot x logit, like ours' init="logit"."""
    import torch
    import zennit.torchvision as ztv
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    torch.set_num_threads(THREADS)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    onehot = torch.zeros(1, 1000)
    onehot[0, target] = 1

    def attributor():
        return Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[getattr(ztv, CANONIZERS[name])()]))
    return attributor, xt, lambda out: onehot * out


def probe(args) -> None:
    """One tool alone: build, 2 warm-up calls, 3 timed calls; print peak memory as JSON."""
    x = image()
    start_mb = peak_rss_mb()
    if args.only == "zennit":
        model = torchvision_model(args.model)
        make, xt, init = zennit_parts(model, args.model, x, args.target)
        ctx = make()
        attributor = ctx.__enter__()
        call = lambda: attributor(xt, init)  # noqa: E731
    elif args.only == "ours":
        call = ours_call(Path(args.onnx), x, args.target)
    else:
        sess = ort_session(Path(args.onnx))
        call = lambda: sess.run(None, {"input": x})  # noqa: E731
    ready_mb = peak_rss_mb()
    times = timeit(call, 3)
    print(json.dumps({"tool": args.only, "start_mb": start_mb, "ready_mb": ready_mb, "peak_mb": peak_rss_mb(),
                      "rss_after_mb": rss_mb(), "median_ms": statistics.median(times)}))


def memory(name: str, path: Path, target: int) -> dict:
    out = {}
    for tool in ("ort", "ours", "zennit"):
        cmd = [sys.executable, __file__, "--only", tool, "--model", name, "--onnx", str(path), "--target", str(target)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode or not lines:
            raise SystemExit(f"memory probe {tool} on {name} failed:\n{res.stderr[-2000:]}")
        out[tool] = json.loads(lines[-1])
    return out


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def bench_model(name: str, repeats: int, tmp: Path) -> dict:
    import torch

    model = torchvision_model(name)
    path = tmp / f"{name}.onnx"
    export(model, path, SIZE)
    x = image()
    sess = ort_session(path)
    logits = sess.run(None, {"input": x})[0]
    target = int(logits.argmax())
    ort_fwd = lambda: sess.run(None, {"input": x})  # noqa: E731

    t0 = time.perf_counter()
    ours = ours_call(path, x, target)
    result = ours()
    first_ms = (time.perf_counter() - t0) * 1e3
    ort_times, ours_times = timeit([ort_fwd, ours], repeats)
    paired = statistics.median(o / f for o, f in zip(ours_times, ort_times))
    ours_rel = result.attributions[0]

    peer_repeats = max(3, repeats // 2)
    make, xt, init = zennit_parts(model, name, x, target)
    with make() as attributor:
        zennit_times = timeit(lambda: attributor(xt, init), peer_repeats)
        out, rel = attributor(xt, init)
    zennit_rel = rel.detach().numpy()[0]
    zennit_logit = float(out.detach().numpy()[0, target])

    def attach_and_run():
        with make() as a:
            a(xt, init)
    attach_times = timeit(attach_and_run, peer_repeats)
    del result, ours
    torch.set_num_threads(THREADS)

    return {"target": target, "logit": float(logits[0, target]), "zennit_logit": zennit_logit,
            "first_ms": first_ms, "paired": paired,
            "rows": [("ORT forward (bare session)", ort_times), ("onnx-saliency lrp", ours_times),
                     ("zennit, hooks attached", zennit_times), ("zennit, attach + run", attach_times)],
            "sum_ours": float(ours_rel.astype(np.float64).sum()), "sum_zennit": float(zennit_rel.astype(np.float64).sum()),
            "pearson": pearson(ours_rel, zennit_rel),
            "max_diff": float(np.abs(ours_rel - zennit_rel).max() / np.abs(zennit_rel).max()),
            "memory": memory(name, path, target)}


def report(results: dict, info: dict, extra: dict, repeats: int) -> str:
    v = info["versions"]
    lines = ["# LRP latency and memory (CPU)", "",
             f"- date: {info['date']}; CPU: {info['cpu']}; nproc {info['nproc']}; {info['mem_gib']:.0f} GiB RAM; "
             f"Python {info['python']}",
             "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- EpsilonPlusFlat, relevance at the input, initial relevance one-hot x logit, {THREADS} threads everywhere "
             "(torch.set_num_threads, Explainer(threads=), ORT intra_op, inter_op 1); random weights (seed 0), one "
             f"1x3x{SIZE}x{SIZE} input, target = the model's top-1 class; ONNX: legacy exporter, opset 17, dynamic batch",
             f"- median (min-max) of {repeats} runs for ORT and ours (called in turn), {max(3, repeats // 2)} for zennit, "
             "after 2 warm-up calls; zennit with ResNetCanonizer / VGGCanonizer; 'hooks attached' times "
             "`attributor(x, init)` inside one entered context, 'attach + run' enters and leaves the context per call",
             "- peak memory: peak RSS (VmHWM; ru_maxrss would carry the parent's peak over fork) of a subprocess running only that tool (build, 2 warm-up + 3 calls); "
             "'imports' is the process before loading the model; the ort and ours subprocesses never import torch",
             f"- load average (the machine is shared with other jobs): {extra['load_before']} before, "
             f"{extra['load_after']} after; total wall {extra['wall_s']:.0f} s", ""]
    for name, r in results.items():
        rows = dict(r["rows"])
        ort_ms = statistics.median(rows["ORT forward (bare session)"])
        ours_ms = statistics.median(rows["onnx-saliency lrp"])
        z_ms = statistics.median(rows["zennit, hooks attached"])
        mem = r["memory"]
        lines += [f"## {name}", "",
                  f"**ours / ORT forward = {r['paired']:.2f}** (median of per-pair ratios; target <= 3), "
                  f"**ours / zennit = {ours_ms / z_ms:.2f}** (hooks attached; target <= 1/3 = 0.33); "
                  f"ours' first call (graph rewrite + session) {r['first_ms']:.0f} ms", "",
                  "| tool | median ms (min-max) | x ORT forward | ours faster by | peak RSS MiB (imports) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        peaks = {"ORT forward (bare session)": mem["ort"], "onnx-saliency lrp": mem["ours"],
                 "zennit, hooks attached": mem["zennit"]}
        for label, times in r["rows"]:
            m = statistics.median(times)
            speed = "" if label.startswith(("ORT", "onnx-saliency")) else f"{m / ours_ms:.2f}x"
            p = peaks.get(label)
            peak = f"{p['peak_mb']:.0f} ({p['start_mb']:.0f})" if p else "same process"
            lines.append(f"| {label} | {med(times)} | {m / ort_ms:.2f} | {speed} | {peak} |")
        lines += ["", f"Relevance (target {r['target']}, logit {r['logit']:.4g}; zennit's logit {r['zennit_logit']:.4g}): "
                  f"sum R / logit ours {r['sum_ours'] / r['logit']:.4f}, zennit {r['sum_zennit'] / r['zennit_logit']:.4f}; "
                  f"Pearson(ours, zennit) {r['pearson']:.6f}; max|ours - zennit| / max|zennit| {r['max_diff']:.1e}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vgg16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results_lrp.md")
    p.add_argument("--only", choices=["ort", "ours", "zennit"], help="memory probe: run one tool alone")
    p.add_argument("--model", help="--only: torchvision model name")
    p.add_argument("--onnx", help="--only: the exported model")
    p.add_argument("--target", type=int, default=0, help="--only: target class")
    args = p.parse_args()
    if args.only:
        probe(args)
        return
    import torch

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    extra = {"load_before": loadavg()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results[name] = bench_model(name, args.repeats, Path(tmp))
            print(f"{name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    extra["load_after"] = loadavg()
    extra["wall_s"] = time.perf_counter() - start
    text = report(results, machine_info(PACKAGES), extra, args.repeats)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
