"""Coverage matrix: which exported classifiers every method explains, and whether their gradients are right.

Models (random weights, seeded):
- every classifier of ``torchvision.models.list_models(module=torchvision.models)``,
- a timm selection (TIMM below; ``pretrained=False``; needs the [bench] extra),
- every Keras application (``keras.applications``, ``weights=None``; needs the [keras] extra).

Exporters: ``legacy`` (torch.onnx.export dynamo=False, opset 17) and ``dynamo`` (the default exporter) for the
torch models, ``keras`` (tf2onnx, opset 17, NHWC) for Keras (tests/exports.py does the exporting).

Each (model, exporter) job runs in its own process with a timeout: build, export, load, then every method on
one image-like input (top-1 target), and the input gradient against the framework's own autograd (torch
autograd, TensorFlow GradientTape; max |ours - ref| / max |ref|). Results go to a JSON cache (default
docs/coverage.json), one entry per job, written as each job ends: a long run can be stopped and continued,
and rerun for failures only (--retry-failed) once more ops are supported. docs/coverage.md is regenerated from
the whole cache after every job (--report-only regenerates it alone).

    python benchmarks/coverage.py --models 'torchvision/resnet18,timm/convnext*' --exporters legacy,dynamo
    nice -n 19 python benchmarks/coverage.py --source torchvision --timeout 1200      # the long run, in chunks
    python benchmarks/coverage.py --retry-failed                                       # after new op rules
    python benchmarks/coverage.py --report-only
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.exports import EXPORTERS, TORCH_EXPORTERS  # noqa: E402

CACHE = ROOT / "docs" / "coverage.json"
REPORT = ROOT / "docs" / "coverage.md"

# one method per line of the report; options keep the matrix affordable without changing what is exercised
METHODS = {
    "gradient": {}, "integrated-gradients": {"steps": 8},
    "gradcam": {}, "gradcam++": {}, "xgradcam": {}, "layercam": {}, "hirescam": {}, "gradcam-elementwise": {},
    "eigencam": {}, "cam": {},
    "lrp": {}, "relevance-cam": {}, "tsgb": {}, "sr-map": {}, "gradcam+ge": {},
    "scorecam": {},  # last: one forward per channel, the costliest; a job timeout loses it first
}
SEED_METHODS = ("relevance-cam", "tsgb", "sr-map", "gradcam+ge")

# timm: one or two small members of each family the issue names, plus a few more op families
TIMM = [
    "convnext_atto", "convnextv2_atto", "efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnet_b0",
    "regnetx_002", "regnety_002", "resnet18d", "resnet50d", "mobilenetv4_conv_small", "mobilenetv4_hybrid_medium",
    "ghostnet_100", "ghostnetv2_100", "repvgg_a0", "nfnet_l0", "dm_nfnet_f0", "efficientformer_l1",
    "efficientformerv2_s0", "levit_128s", "mobilevit_xxs", "mobilevitv2_050", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "fastvit_t8", "edgenext_xx_small", "poolformer_s12", "rexnet_100", "hrnet_w18_small",
    "cspresnet50", "dla34", "tinynet_a", "lcnet_050", "mixnet_s", "coat_lite_tiny", "res2net50_14w_8s", "sknet",
]
# keras.applications that are models (the module also holds the per-family submodules)
KERAS_SKIP = {"imagenet_utils"}


# --- the catalogue ------------------------------------------------------------------------------------------

def torchvision_names() -> list[str]:
    from onnx_saliency.parity import install_torchvision_cpu_shim

    install_torchvision_cpu_shim()
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def keras_names() -> list[str]:
    from tests.exports import import_tensorflow

    import_tensorflow()
    import keras

    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and n not in KERAS_SKIP)


def catalogue(sources) -> list[str]:
    ids = []
    if "torchvision" in sources:
        ids += [f"torchvision/{n}" for n in torchvision_names()]
    if "timm" in sources:
        ids += [f"timm/{n}" for n in TIMM]
    if "keras" in sources:
        ids += [f"keras/{n}" for n in keras_names()]
    return ids


def exporters_of(model_id: str) -> tuple:
    return ("keras",) if model_id.startswith("keras/") else TORCH_EXPORTERS


def selected(ids, patterns) -> list[str]:
    if not patterns:
        return ids
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [i for i in ids if any(fnmatch.fnmatch(i, p) or fnmatch.fnmatch(i.split("/", 1)[1], p) for p in pats)]


# --- one job, in its own process ----------------------------------------------------------------------------

UNSUPPORTED = re.compile(r"(unsupported op\(s\) in|no relevance rule for) (\d+) node\(s\): (.*)")


def _op_counts(listing: str) -> dict[str, int]:
    """Op types and node counts of a node listing, in either spelling the library has used:
    "name (Op), name (Op)" or grouped "Op (12: a, b, c and 9 more); Op (2: d, e)"."""
    grouped = re.findall(r"(?:^|; )([A-Za-z0-9_.]+) \((\d+): ", listing)
    if grouped:
        return {op: int(n) for op, n in grouped}
    counts: dict[str, int] = {}
    for op in re.findall(r"\(([A-Za-z0-9_.]+)\)(?:, |$)", listing):
        counts[op] = counts.get(op, 0) + 1
    return counts


def _line(err: BaseException, path: Path | None = None) -> str:
    """The error's first line without the temporary file's path; a list of unsupported nodes becomes the op
    types with their node counts (one line that reads the same for every model it blocks)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    if path is not None:
        line = line.replace(f"{path}: ", "").replace(str(path), "model.onnx")
    m = UNSUPPORTED.search(line)
    if m:
        what = "unsupported op(s)" if m.group(1).startswith("unsupported") else "no relevance rule for op(s)"
        line = line[:m.start()] + f"{what}: " + ", ".join(sorted(_op_counts(m.group(3)))) + f" ({m.group(2)} nodes)"
    return f"{type(err).__name__}: {line}"[:300]


def unsupported_ops(error: str) -> list[str]:
    m = re.search(r"(?:unsupported op\(s\)|no relevance rule for op\(s\)): ([A-Za-z0-9_., ]+) \(\d+ nodes\)", error)
    return [op.strip() for op in m.group(1).split(",")] if m else []


def _emit(out, **record):
    out.write(json.dumps(record) + "\n")
    out.flush()


def build_torch(model_id: str, seed: int):
    import torch

    from onnx_saliency.parity import install_torchvision_cpu_shim
    from tests.torch_shim import randomise_bn

    torch.manual_seed(seed)
    source, name = model_id.split("/", 1)
    if source == "torchvision":
        install_torchvision_cpu_shim()
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        size = 299 if name == "inception_v3" else 224
    else:
        install_torchvision_cpu_shim()  # timm imports torchvision
        import timm

        model = timm.create_model(name, pretrained=False)
        size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    randomise_bn(model, seed + 1)  # fresh BatchNorms are the identity: folding them would prove nothing
    redraw_zero_weights(model, seed + 2)
    return model.eval(), size


def redraw_zero_weights(model, seed: int) -> list[str]:
    """Weights initialised to all zeros (torchvision's ViT heads, some timm heads) give zero logits and zero
    gradients: every map would be trivially flat and gradient parity 0 = 0. Redraw them, N(0, 0.02)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    redrawn = []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not p.detach().any():
            with torch.no_grad():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            redrawn.append(name)
    return redrawn


def build_keras(model_id: str, seed: int, size: int = 224):
    from tests.exports import import_tensorflow, randomise_keras_bn

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    ctor = getattr(keras.applications, model_id.split("/", 1)[1])
    try:  # 224 where the application allows another size than its default (NASNetLarge: 331, Inception: 299)
        model = ctor(weights=None, input_shape=(size, size, 3))
    except ValueError:
        model = ctor(weights=None)
        size = int(model.inputs[0].shape[1])
    randomise_keras_bn(model, seed + 1)
    return model, size


def image_like(size: int, seed: int = 0):
    """One smooth, image-like NCHW input with torchvision's normalisation."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cells = max(size // 8, 1)
    base = rng.uniform(0, 1, (1, 3, cells, cells)).repeat(8, axis=2).repeat(8, axis=3)[:, :, :size, :size]
    if base.shape[-1] < size:
        base = np.pad(base, ((0, 0), (0, 0), (0, size - base.shape[2]), (0, size - base.shape[3])), mode="edge")
    img = 0.7 * base + 0.3 * rng.uniform(0, 1, (1, 3, size, size))
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((img - mean) / std).astype(np.float32)


def run_job(model_id: str, exporter: str, methods, out, threads: int, max_params: float = 0,
            seed: int = 0) -> None:
    """Build, export, load and explain one model; one JSON line per step to `out`."""
    import numpy as np
    import onnx

    from onnx_saliency import Explainer
    from tests.exports import (export_keras, export_torch, keras_input_gradient, relative_max_error,
                               torch_input_gradient)

    keras_job = exporter == "keras"
    t0 = time.perf_counter()
    try:
        if keras_job:
            model, size = build_keras(model_id, seed)
            params = int(model.count_params())
        else:
            import torch

            torch.set_num_threads(threads)
            model, size = build_torch(model_id, seed)
            params = sum(p.numel() for p in model.parameters())
    except Exception as err:  # noqa: BLE001 - every failure is a result here
        _emit(out, step="build", error=_line(err))
        return
    if max_params and params > max_params * 1e6:
        _emit(out, step="build", error=f"not run: {params / 1e6:.0f} M parameters > --max-params {max_params:g} M",
              params=params, size=size)
        return
    _emit(out, step="build", seconds=time.perf_counter() - t0, size=size, params=params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        try:
            if keras_job:
                export_keras(model, path, preset="torchvision")
            else:
                export_torch(model, path, size, exporter)
        except Exception as err:  # noqa: BLE001
            _emit(out, step="export", error=_line(err))
            return
        proto = onnx.load(str(path), load_external_data=False)
        ops = sorted({n.op_type for n in proto.graph.node})
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        _emit(out, step="export", seconds=time.perf_counter() - t0, opset=opset, ops=ops,
              nodes=len(proto.graph.node))
        del proto
        t0 = time.perf_counter()
        try:
            ex = Explainer(path, threads=threads)
        except Exception as err:  # noqa: BLE001
            _emit(out, step="load", error=_line(err, path))
            return
        _emit(out, step="load", seconds=time.perf_counter() - t0)
        x = image_like(size)
        xin = x.transpose(0, 2, 3, 1).copy() if ex.model.layout == "NHWC" else x
        target = None
        for name in methods:
            t0 = time.perf_counter()
            try:
                r = ex.explain(xin, method=name, batch_size=8, **METHODS.get(name, {}))
                if not np.isfinite(r.maps).all():
                    raise FloatingPointError("the map has NaN or Inf values")
                if name == "gradient":
                    target = int(r.targets[0])
                    ours = r.attributions
                _emit(out, step="method", method=name, seconds=time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001
                _emit(out, step="method", method=name, error=_line(err, path), seconds=time.perf_counter() - t0)
            # one session per rewritten graph adds up to many copies of a large model's weights over 15 methods
            ex.engine.drop_sessions()
        del ex
        if target is None:
            return
        t0 = time.perf_counter()
        try:
            floor = {}
            if keras_job:
                ref = keras_input_gradient(model, x.transpose(0, 2, 3, 1), [target]).transpose(0, 3, 1, 2)
            else:
                ref = torch_input_gradient(model, x, [target])
                # the float32 noise floor: torch's own float32 gradient against its float64 one (deep random nets
                # with vanishing signals, e.g. GoogLeNet's std-0.01 init, reach 1e-15 gradients where float32
                # rounding alone moves the result by tens of percent)
                ref64 = torch_input_gradient(model.double(), x.astype(np.float64), [target])
                floor = {"float32_floor": relative_max_error(ref, ref64),
                         "max_rel_error_f64": relative_max_error(ours, ref64)}
            if not np.abs(ref).max() > 0:
                raise ValueError("the reference gradient is all zeros (degenerate random model)")
            err = relative_max_error(ours, ref)
            flat_o, flat_r = ours.ravel().astype(np.float64), ref.ravel().astype(np.float64)
            rel_l2 = float(np.linalg.norm(flat_o - flat_r) / max(np.linalg.norm(flat_r), 1e-30))
            _emit(out, step="parity", reference="tf" if keras_job else "torch", target=target,
                  max_rel_error=err, rel_l2=rel_l2, peak=float(np.abs(ref).max()),
                  seconds=time.perf_counter() - t0, **floor)
        except Exception as err:  # noqa: BLE001
            _emit(out, step="parity", error=_line(err))


def worker_main(args) -> int:
    with open(args.result, "a") as out:
        try:
            run_job(args.worker, args.exporter, args.methods.split(","), out, args.threads, args.max_params)
        except Exception as err:  # noqa: BLE001
            _emit(out, step="crash", error=_line(err), trace=traceback.format_exc()[-2000:])
    return 0


# --- the driver ---------------------------------------------------------------------------------------------

def job_key(model_id: str, exporter: str) -> str:
    return f"{model_id}|{exporter}"


def collect(lines: list[dict], methods) -> dict:
    """Fold a job's JSON lines into one cache entry."""
    entry = {"steps": {}, "methods": {}, "parity": None}
    for rec in lines:
        step = rec.pop("step")
        if step == "method":
            entry["methods"][rec.pop("method")] = rec
        elif step == "parity":
            entry["parity"] = rec
        else:
            entry["steps"][step] = rec
    failed = next((f"{s}: {r['error']}" for s, r in entry["steps"].items() if "error" in r), None)
    for m in methods:
        if m not in entry["methods"] and failed:
            entry["methods"][m] = {"error": failed, "not_run": True}
    return entry


def run_one(model_id: str, exporter: str, methods, timeout: float, threads: int, max_params: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
        result = f.name
    cmd = [sys.executable, __file__, "--worker", model_id, "--exporter", exporter, "--methods", ",".join(methods),
           "--result", result, "--threads", str(threads), "--max-params", str(max_params)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads),
           "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    lines = []
    with open(result) as f:
        for raw in f:
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                pass
    os.unlink(result)
    entry = collect(lines, methods)
    entry["wall_s"] = round(wall, 1)
    if timed_out or proc.returncode not in (0, None):
        if timed_out:
            why = f"job timed out after {timeout:.0f} s"
        elif proc.returncode and proc.returncode < 0:
            why = f"job killed by signal {-proc.returncode} (memory?)"
        else:
            why = f"job exited {proc.returncode}: {(stderr or '').strip().splitlines()[-1:] or ''}"
        entry["aborted"] = why
        for m in methods:
            entry["methods"].setdefault(m, {"error": why, "not_run": True})
    return entry


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("onnx", "onnxruntime", "torch", "torchvision", "timm", "tensorflow-cpu", "tf2onnx", "keras"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_cache(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"jobs": {}}


def save_cache(cache: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def failed(entry: dict) -> bool:
    return "aborted" in entry or any("error" in r for r in entry["methods"].values()) or entry["parity"] is None \
        or "error" in (entry["parity"] or {})


def driver(args) -> int:
    cache_path = Path(args.cache)
    cache = load_cache(cache_path)
    if args.report_only:
        write_report(cache, Path(args.out))
        return 0
    methods = args.methods.split(",") if args.methods else list(METHODS)
    sources = args.source.split(",")
    everything = catalogue(sources)
    cache.setdefault("catalogue", {}).update(
        {s: [i for i in everything if i.startswith(s + "/")] for s in sources})
    ids = selected(everything, args.models)
    exporters = args.exporters.split(",")
    jobs = [(i, e) for i in ids for e in exporters_of(i) if e in exporters]
    todo = []
    for model_id, exporter in jobs:
        entry = cache["jobs"].get(job_key(model_id, exporter))
        stale = exporter != "keras" and entry is not None and entry.get("parity") and \
            "float32_floor" not in entry["parity"]  # cached before the float64 reference was added
        if entry is None or args.rerun or stale or (args.retry_failed and failed(entry)) or \
                set(methods) - set(entry["methods"]):
            todo.append((model_id, exporter))
    print(f"{len(jobs)} jobs selected, {len(todo)} to run", flush=True)
    start = time.perf_counter()
    for k, (model_id, exporter) in enumerate(todo, 1):
        t0 = time.perf_counter()
        entry = run_one(model_id, exporter, methods, args.timeout, args.threads, args.max_params)
        entry.update({"model": model_id, "exporter": exporter, "when": datetime.datetime.now().isoformat(
            timespec="seconds"), "commit": git_commit(), "load": " ".join(f"{v:.1f}" for v in os.getloadavg())})
        key = job_key(model_id, exporter)
        old = cache["jobs"].get(key)
        if old is not None and not args.rerun:  # keep the results of methods not run this time
            merged = dict(old["methods"])
            merged.update(entry["methods"])
            entry["methods"] = merged
        cache["jobs"][key] = entry
        cache["versions"] = versions()
        save_cache(cache, cache_path)
        write_report(cache, Path(args.out))
        ok = sum("error" not in r for r in entry["methods"].values())
        parity = entry["parity"] or {}
        print(f"[{k}/{len(todo)}] {key}: {ok}/{len(entry['methods'])} ok, grad rel err "
              f"{parity.get('max_rel_error', parity.get('error', '-'))}, {time.perf_counter() - t0:.0f} s "
              f"(total {time.perf_counter() - start:.0f} s)", flush=True)
    return 0


# --- the report ---------------------------------------------------------------------------------------------

def write_report(cache: dict, path: Path) -> None:
    jobs = sorted(cache["jobs"].values(), key=lambda e: (e["model"].split("/")[0], e["model"], e["exporter"]))
    methods = [m for m in METHODS if any(m in e["methods"] for e in jobs)]
    errors: dict[str, int] = {}

    def cell(entry, m):
        r = entry["methods"].get(m)
        if r is None:
            return ""
        if "error" not in r:
            return "ok"
        code = errors.setdefault(r["error"], len(errors) + 1)
        return f"E{code}"

    lines = ["# Coverage: exported classifiers x exporters x methods", "",
             'Generated by `benchmarks/coverage.py` from `docs/coverage.json` (the cache: one entry per model and',
             'exporter, with when and at which commit it ran). Random weights (seeded; BatchNorm statistics',
             'randomised, all-zero initialised weights such as ViT heads redrawn), one image-like input, top-1',
             'target. `ok`: the',
             'method returned a finite map; `E<n>`: the error numbered below (its first line, verbatim). Gradient',
             "parity: our input gradient against torch autograd (torch exports) or TensorFlow's GradientTape (Keras",
             'exports), max |ours - ref| / max |ref| and the relative L2 error; for torch models also the float32',
             "floor, torch's own float32 gradient against its float64 one (`gradient parity` in the summary counts a",
             'model when its error is <= 1e-2, or when it is no further from the float64 gradient than twice that',
             'floor). Integrated gradients runs 8 steps here.',
             ""]
    lines += _what_ran(cache, jobs, methods)
    lines += _summary(jobs, methods)
    lines += ["", "## Per model", "",
              "| model | exporter | opset | params (M) | grad max rel err | rel L2 | f32 floor | " + " | ".join(methods)
              + " |", "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for e in jobs:
        exp = e["steps"].get("export", {})
        build = e["steps"].get("build", {})
        par = e["parity"] or {}
        err = f"{par['max_rel_error']:.1e}" if "max_rel_error" in par else ("err" if "error" in par else "-")
        l2 = f"{par['rel_l2']:.1e}" if "rel_l2" in par else "-"
        floor = f"{par['float32_floor']:.1e}" if "float32_floor" in par else "-"
        params = f"{build['params'] / 1e6:.1f}" if "params" in build else "-"
        lines.append(f"| {e['model']} | {e['exporter']} | {exp.get('opset', '-')} | {params} | {err} | {l2} | "
                     f"{floor} | "
                     + " | ".join(cell(e, m) for m in methods) + " |")
    lines += ["", "## Ops that stop models", "",
              "Unsupported op types named by the load or method errors above, with the (model, exporter) jobs they "
              "stop.", "", "| op | jobs | models |", "| --- | --- | --- |"]
    blocking: dict[str, set] = {}
    for e in jobs:
        for r in e["methods"].values():
            for op in unsupported_ops(r.get("error", "")):
                blocking.setdefault(op, set()).add((e["model"], e["exporter"]))
    for op, hits in sorted(blocking.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        names = sorted({m for m, _ in hits})
        lines.append(f"| {op} | {len(hits)} | {', '.join(names[:12])}{' ...' if len(names) > 12 else ''} |")
    lines += ["", "## Errors", ""]
    lines += [f"- **E{code}** `{text.replace('`', chr(39))}`" for text, code in errors.items()]
    lines += ["", "## Runs", "", "| model | exporter | when | commit | wall (s) | load avg |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {e['model']} | {e['exporter']} | {e['when']} | {e['commit']} | {e['wall_s']} | {e['load']} |"
              for e in jobs]
    v = cache.get("versions", {})
    lines += ["", "Versions of the last run: " + ", ".join(f"{k} {val}" for k, val in v.items() if val), ""]
    path.write_text("\n".join(lines) + "\n")


def _what_ran(cache: dict, jobs, methods) -> list[str]:
    """What the cache holds against the whole catalogue: runs, dates, commits, load, what is missing."""
    if not jobs:
        return ["Nothing has run yet.", ""]
    out = ["## What was run", ""]
    whens = sorted(e["when"] for e in jobs)
    commits = sorted({e["commit"] for e in jobs})
    loads = [float(e["load"].split()[0]) for e in jobs if e.get("load")]
    out.append(f"{len(jobs)} (model, exporter) jobs, {whens[0]} to {whens[-1]}, at commit(s) {', '.join(commits)}, "
               f"one thread each at `nice -n 19` on the shared 2-core development machine (1-min load average "
               f"{min(loads):.1f} to {max(loads):.1f} while they ran: timings are not benchmarks).")
    cat = cache.get("catalogue", {})
    done = {(e["model"], e["exporter"]) for e in jobs}
    for source, ids in sorted(cat.items()):
        expected = [(i, x) for i in ids for x in exporters_of(i)]
        missing = sorted({i.split("/", 1)[1] for i, x in expected if (i, x) not in done})
        ran = sum(1 for job in expected if job in done)
        out.append(f"- {source}: {len(ids)} models, {ran} of {len(expected)} jobs run"
                   + (f"; not run yet (at least one exporter): {', '.join(missing)}" if missing else ""))
    for source in ("torchvision", "timm", "keras"):
        if source not in cat:
            out.append(f"- {source}: not run yet")
    never = [m for m in METHODS if m not in methods]
    if never:
        out.append(f"- methods not run yet on any job: {', '.join(never)}")
    partial = {m: sum(1 for e in jobs if m not in e["methods"]) for m in methods}
    partial = {m: n for m, n in partial.items() if n}
    if partial:
        out.append("- methods not run on every job: " + ", ".join(f"{m} (missing on {n})" for m, n in partial.items()))
    skipped = sorted(e["model"] for e in jobs if "not run" in e["steps"].get("build", {}).get("error", ""))
    if skipped:
        out.append(f"- skipped for size (--max-params): {', '.join(sorted(set(skipped)))}")
    out.append("")
    return out


def parity_ok(parity) -> bool:
    """Our gradient is right when it is within 1e-2 (max relative) of the framework's float32 autograd, or no
    further from the float64 gradient than twice torch's own float32 error (the float32 floor)."""
    if not parity or "max_rel_error" not in parity:
        return False
    if parity["max_rel_error"] <= 1e-2:
        return True
    return "float32_floor" in parity and parity["max_rel_error_f64"] <= 2 * parity["float32_floor"]


def _summary(jobs, methods) -> list[str]:
    groups: dict[tuple, list] = {}
    for e in jobs:
        groups.setdefault((e["model"].split("/")[0], e["exporter"]), []).append(e)
    out = ["## Summary", "", "Models explained (`ok`) out of the models run, per source and exporter.", "",
           "| source | exporter | models | gradient parity | " + " | ".join(methods) + " |",
           "| --- | --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for (source, exporter), es in sorted(groups.items()):
        good = sum(1 for e in es if parity_ok(e["parity"]))
        cells = []
        for m in methods:
            ran = [e for e in es if m in e["methods"]]
            cells.append(f"{sum('error' not in e['methods'][m] for e in ran)}/{len(ran)}")
        out.append(f"| {source} | {exporter} | {len(es)} | {good}/{len(es)} | " + " | ".join(cells) + " |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma list of ids or fnmatch patterns (torchvision/resnet*, "
                                                "timm/convnext_atto, keras/*, or bare names)")
    p.add_argument("--source", default="torchvision,timm,keras", help="catalogues to draw from")
    p.add_argument("--exporters", default=",".join(EXPORTERS))
    p.add_argument("--methods", default="", help=f"comma list (default all: {','.join(METHODS)})")
    p.add_argument("--timeout", type=float, default=900, help="seconds per (model, exporter) job")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of torch, TF and onnxruntime")
    p.add_argument("--max-params", type=float, default=150, help="skip (and report) models with more "
                   "parameters than this many millions; 0: no limit (the gradient graphs of a 600 M model need "
                   "tens of GB)")
    p.add_argument("--rerun", action="store_true", help="rerun cached jobs too")
    p.add_argument("--retry-failed", action="store_true", help="rerun cached jobs that have any error")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from the cache")
    p.add_argument("--cache", default=str(CACHE))
    p.add_argument("--out", default=str(REPORT))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--exporter", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
