"""Where onnx-saliency's Grad-CAM time goes: bare forward vs our explain graph vs the numpy post-processing.

    python benchmarks/profile_gradcam.py [--models resnet50,vgg16] [--repeats 10]

Same models/input/threads as bench_gradcam.py. Prints (1) a stage breakdown of Explainer.explain and
(2) an onnxruntime per-node profile of the explain graph, grouped into forward nodes, the in-graph target
seed (ts/*) and the appended backward (vjp/*).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench_gradcam import MODELS, SIZE, TARGET, THREADS, export, onnx_layer, timeit, torchvision
from onnx_saliency import Explainer
from onnx_saliency.methods import get_method
from onnx_saliency.methods.base import Request
from onnx_saliency.output.postprocess import scale_cam_image


def session(model_or_path, profile: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.enable_profiling = profile
    from graph_passes._graph import materialize  # loaded models keep their weights in a store, not the proto

    src = materialize(model_or_path).SerializeToString() if hasattr(model_or_path, "SerializeToString") \
        else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def med(times) -> str:
    return f"{statistics.median(times):7.1f} ms ({min(times):.1f}-{max(times):.1f})"


def profile_model(name: str, repeats: int, tmp: Path) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    path = tmp / f"{name}.onnx"
    export(model, path)
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    ex = Explainer(path, preset="torchvision", threads=THREADS, optimize=True)  # per call: the steady state
    layer = onnx_layer(ex, MODELS[name][2])
    targets = np.full(1, TARGET, np.int64)
    eng = ex.engine

    bare = session(path)
    canon = session(ex.model.canonical)
    key, build = eng.graph(expose=[layer])
    expose_only = session(build(ex.model.canonical))
    key, build = eng.graph(expose=[layer], wrt=[layer])
    explain_graph = build(ex.model.canonical)
    explain_sess = session(explain_graph)
    feeds = {"input": x, "targets": targets}
    out = eng.run(x, targets, expose=[layer], wrt=[layer])
    req = Request(eng, x, targets, [layer])
    A, G = out[layer], out[layer + "__grad"]
    cam = np.maximum(np.einsum("nk,nkhw->nhw", G.mean(axis=(2, 3)), A), 0).astype(np.float32)
    method = get_method("gradcam")

    stages = [
        ("bare ORT forward (exported file)", lambda: bare.run(None, {"input": x})),
        ("ORT forward of the canonical graph", lambda: canon.run(None, {"input": x})),
        ("+ target seed + layer exposed (no vjp)", lambda: expose_only.run(None, feeds)),
        ("explain graph, bare session.run", lambda: explain_sess.run(None, feeds)),
        ("Engine.run (explain graph)", lambda: eng.run(x, targets, expose=[layer], wrt=[layer])),
        ("GradCAM.explain (run + CAM + resize)", lambda: method.explain(req)),
        ("Explainer.explain (all)", lambda: ex.explain(x, method="gradcam", layer=layer, target=TARGET)),
        ("  numpy CAM weights + einsum + relu", lambda: np.maximum(np.einsum("nk,nkhw->nhw", G.mean(axis=(2, 3)), A), 0)),
        ("  scale_cam_image (min-max + cv2 resize)", lambda: scale_cam_image(cam, (SIZE, SIZE))),
        ("  Explainer.prepare (checks)", lambda: ex.prepare(x)),
    ]
    print(f"\n== {name}: layer {layer}")
    for label, fn in stages:
        print(f"{label:45s} {med(timeit(fn, repeats))}", flush=True)

    # onnxruntime per-node profile of the explain graph
    prof = session(explain_graph, profile=True)
    for _ in range(2 + repeats):
        prof.run(None, feeds)
    trace_file = Path(prof.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    runs = [e for e in trace if e.get("name") == "model_run"][2:]  # skip the warm-up runs
    per_group, per_node = collections.Counter(), collections.Counter()
    kernel = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
              and e["ts"] >= runs[0]["ts"]]
    n_runs = len(runs)
    for e in kernel:
        node = e["name"][: -len("_kernel_time")]
        group = "backward (vjp/*)" if node.startswith("vjp/") else "target seed (ts/*)" if node.startswith("ts/") else "forward"
        per_group[group] += e["dur"] / 1e3 / n_runs
        per_node[f"{e['args'].get('op_name')} {node}"] += e["dur"] / 1e3 / n_runs
    total = sum(per_group.values())
    print(f"ORT profile, mean per run over {n_runs} runs (model_run median "
          f"{statistics.median(e['dur'] for e in runs) / 1e3:.1f} ms); kernel time {total:.1f} ms:")
    for group, ms in per_group.most_common():
        print(f"  {group:22s} {ms:7.2f} ms  {100 * ms / total:5.1f}%")
    print("  top backward / seed nodes:")
    for node, ms in [(k, v) for k, v in per_node.most_common() if "vjp/" in k or " ts/" in k][:8]:
        print(f"    {ms:7.2f} ms  {node}")
    print("  top forward nodes:")
    for node, ms in [(k, v) for k, v in per_node.most_common() if "vjp/" not in k and " ts/" not in k][:5]:
        print(f"    {ms:7.2f} ms  {node}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vgg16")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            profile_model(name, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
