"""Helpers shared by the benchmark scripts: torchvision export, interleaved timing, machine info, peak memory.

Importing this module does not import torch (the memory subprocesses of bench_lrp.py must not pay for it).
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

# the one torchvision import shim, where users of the [parity] extra meet it (see docs/stack-probe.md §3)
from onnx_saliency.parity import install_torchvision_cpu_shim


def torchvision_model(name: str, seed: int = 0):
    """A random-weight torchvision classifier in eval mode (torch.manual_seed(seed) before building)."""
    import torch

    install_torchvision_cpu_shim()
    import torchvision

    torch.manual_seed(seed)
    return getattr(torchvision.models, name)().eval()


def export(model, path: Path, size: int = 224, opset: int = 17) -> None:
    """Legacy (TorchScript) exporter, dynamic batch, preprocessing preset declared in the file."""
    import onnx
    import torch

    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    m = onnx.load(str(path))
    onnx.helper.set_model_props(m, {"onnx_saliency.preset": "torchvision"})
    onnx.save(m, str(path))


def arguments(doc: str, models: str, repeats: int, out: str):
    """The options every benchmark takes: --models (comma list), --repeats, --out (the markdown report)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--models", default=models)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--out", default=out)
    return p


def run_models(names: str, bench) -> tuple[dict, dict]:
    """bench(name, folder) for each model of the comma list `names`, in one temporary folder, with progress
    lines; returns (results by name, {"load_before", "load_after", "wall_s"})."""
    import tempfile

    start = time.perf_counter()
    extra = {"load_before": loadavg()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names.split(","):
            results[name] = bench(name, Path(tmp))
            print(f"{name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    extra["load_after"] = loadavg()
    extra["wall_s"] = time.perf_counter() - start
    return results, extra


def image(size: int = 224) -> np.ndarray:
    """One (1, 3, size, size) input: uniform random pixels (seed 0) with torchvision's normalisation."""
    rng = np.random.default_rng(0)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    img = rng.integers(0, 256, (size, size, 3)).astype(np.float32) / 255
    return np.ascontiguousarray(((img - mean) / std).transpose(2, 0, 1)[None], np.float32)


def ort_session(model, threads: int = 2):
    """A bare onnxruntime CPU session of a file path or a ModelProto: `threads` intra-op threads, one inter-op."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    from graph_passes._graph import materialize  # loaded models keep their weights in a store, not the proto

    source = str(model) if isinstance(model, (str, Path)) else materialize(model).SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def timeit(fns, repeats: int, warmup: int = 2, settle=None) -> list:
    """Wall-clock ms of `repeats` calls of each fn after `warmup` untimed calls. Several fns are called in
    turn (round robin), so a change in machine load hits all of them alike.

    settle[i]: call fn i once untimed right before each timed call. onnxruntime's and torch's worker threads
    spin-wait for a while after a call; on 2 cores the previous tool's spinning threads otherwise take the
    cores from the next tool's timed call (here the bare ResNet-50 forward took 83-92 ms right after the LRP
    call against 42-48 ms after a settling call)."""
    single = not isinstance(fns, (list, tuple))
    fns = [fns] if single else list(fns)
    settle = list(settle) if settle is not None else [False] * len(fns)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts, calm in zip(fns, times, settle):
            if calm:
                fn()
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return times[0] if single else times


def med(times) -> str:
    """'median (min-max)' in ms."""
    return f"{statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f})"


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    VmHWM (the high-water mark of this process image), not getrusage's ru_maxrss: Linux carries ru_maxrss over
    fork + exec, so a subprocess would report its parent's peak when that is higher."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size in MiB (0 where /proc is absent)."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


def machine_info(packages) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    versions = {}
    for p in packages:
        try:
            versions[p] = version(p)
        except PackageNotFoundError:
            versions[p] = "absent"
    mem_kib = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "nproc": os.cpu_count(),
            "mem_gib": mem_kib / 2**20, "python": platform.python_version(), "versions": versions}
