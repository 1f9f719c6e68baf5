"""The driver of a scale-out run: ``explain_dataset`` on a Ray cluster with Ray Data.

The driver loads and checks the model, resolves layers and targets, and builds every rewritten graph once
(``graphs.record_graphs``); the loaded model and the graphs go to the object store once. The images become a
``ray.data.Dataset`` of small rows (id, path, target); ``map_batches`` with an actor pool runs
``actor.ExplainShard``: one Explainer and one onnxruntime session per graph per actor, built once, with
``intra_op_num_threads = cpus_per_actor``. Each call handles one shard: it reads and decodes its images,
explains them through the same loop as the local engine (``output.batch.explain_images``) and writes them
(the same png/npy/json files, or one atomically committed Parquet shard). The driver only streams back one
summary row per shard: progress, failures, timings.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SaliencyError
from ..intake.preprocess import MAX_PIXELS
from ..output.batch import PartialFailure
from . import parquet
from .actor import ExplainShard, Shipment
from .graphs import record_graphs

FORMATS = ("files", "parquet")


@dataclass
class ScaleOutcome:
    images: int = 0                                   # images in the source
    written: int = 0                                  # explained and written by this run
    resumed: int = 0                                  # already complete (--resume)
    failed: dict = field(default_factory=dict)        # id -> {"id", "path", "error"}
    constant: list = field(default_factory=list)      # [id, method, value]
    notes: list = field(default_factory=list)         # (method, note), each once
    seconds: float = 0.0                              # wall time of the distributed part
    setup_seconds: float = 0.0                        # driver: model, graphs, object store, cluster
    shards: list = field(default_factory=list)        # one summary dict per shard (timings, memory)
    graph_misses: int = 0                             # graphs an actor had to build (none expected)
    actors: int = 0

    @property
    def images_per_s(self) -> float:
        done = self.written + len(self.failed)
        return done / self.seconds if self.seconds > 0 else 0.0

    def raise_for_failures(self) -> None:
        if self.failed:
            names = ", ".join(Path(f["path"]).name if f["path"] else f["id"] for f in self.failed.values())
            raise PartialFailure(f"{len(self.failed)} of {self.images} image(s) failed and were skipped: {names}")


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise SaliencyError("--engine ray needs Ray Data: pip install 'onnx-saliency[ray]'") from err
    return ray


def _last_error_line(err: BaseException) -> str:
    """'SomeError: message' from the remote traceback Ray puts in its error's text, else the error's own line."""
    import re

    lines = [line.strip() for line in str(err).splitlines()]
    found = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", line)]
    return found[-1] if found else f"{type(err).__name__}: {next((x for x in lines if x), '')}"


def _rows_from_paths(paths, targets) -> list[dict]:
    rows, stems = [], {}
    for i, p in enumerate(paths):
        text = str(p)
        stem = Path(text).stem
        if stem in stems:
            raise SaliencyError(f"several images share the name {stem!r}; outputs are written per image stem")
        stems[stem] = i
        rows.append({"id": stem, "path": text, "target": int(targets[i])})
    return rows


def _paths_of(source) -> list[str] | None:
    """A folder, one path or URI, or a list of them -> paths; None for a ray.data.Dataset."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if isinstance(source, (list, tuple)):
        out = []
        for item in source:
            text = str(item)
            p = Path(text)
            if "://" in text:
                out += _list_uri(text)
            elif p.is_dir():
                found = sorted(f for f in p.iterdir() if f.suffix.lower() in _SUFFIXES and f.is_file())
                if not found:
                    raise SaliencyError(f"{p}: folder contains no images")
                out += [str(f) for f in found]
            else:
                out.append(text)  # read (or reported missing) by the actor that gets it, not stat'ed here
        if not out:
            raise SaliencyError("no images given")
        return out
    return None


def _list_uri(uri: str) -> list[str]:
    """The images in a URI folder (pyarrow's file systems: s3://, gs://, hdfs://, file://), or the URI itself."""
    try:
        from pyarrow import fs
    except ImportError as err:
        raise SaliencyError(f"{uri}: URIs need pyarrow: pip install 'onnx-saliency[ray]'") from err
    try:
        filesystem, inner = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(inner)
        if info.type != fs.FileType.Directory:
            return [uri]
        found = filesystem.get_file_info(fs.FileSelector(inner, recursive=False))
    except (OSError, ValueError) as err:
        raise SaliencyError(f"{uri}: cannot list ({str(err).splitlines()[0]})") from None
    scheme = uri.split("://", 1)[0]
    names = sorted(f.path for f in found if f.type == fs.FileType.File and Path(f.path).suffix.lower() in _SUFFIXES)
    if not names:
        raise SaliencyError(f"{uri}: folder contains no images")
    return [f"{scheme}://{name}" for name in names]  # s3: "bucket/key"; file: "/abs/path"


_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
             ".pam"}


def _shipped_model(model):
    """The LoadedModel without its original graph's weights (actors only need the canonical graph)."""
    from graph_passes._graph import skeleton

    light = copy.copy(model)
    light.original = skeleton(model.original)
    return light


def explain_dataset(source, model, methods=("gradcam",), *, layer="auto", target=None, preset=None,
                    out="saliency_out", fmt: str = "files", actors: int | None = None, cpus_per_actor: float = 1,
                    gpus_per_actor: float = 0, batch_size: int = 16, shard_size: int | None = None,
                    options: dict | None = None, provider: str = "cpu", max_pixels: int = MAX_PIXELS,
                    memory_budget: int | None = None, resume: bool = False, address: str | None = None,
                    on_failure: Callable[[str], None] = lambda line: None,
                    on_progress: Callable[[int], None] = lambda n: None,
                    on_start: Callable[[int], None] = lambda total: None) -> ScaleOutcome:
    """Explain every image of `source` on a Ray cluster; write per-image files or a Parquet dataset to `out`.

    source: a folder, a path or URI, a list of those, or a ``ray.data.Dataset`` with an ``image`` column
    (decoded uint8 arrays, as ``ray.data.read_images`` gives) or a ``bytes`` column (encoded files, as
    ``read_binary_files``; decoded here exactly as local files are), and an ``id`` or ``path`` column (outputs
    are named by the id, or by the path's stem); an optional ``target`` column gives per-image targets.
    model: a path or an :class:`~onnx_saliency.Explainer` (its preprocessing, labels and memory budget are used).
    target: None (top-1), a class index or label, or one per image for path sources.
    Connects to `address` ("auto", "HOST:PORT", "ray://...") or, without one, to the Ray instance this process
    already started, or starts a local one (shut down again at the end).
    Per-image failures are collected in the outcome (and, for Parquet, in ``errors.parquet``); anything else
    raises :class:`SaliencyError` before the first image, or as soon as an actor meets it.
    """
    from ..explainer import Explainer
    from ..methods import get_method

    started = time.perf_counter()
    shard_size = _check_numbers(fmt, cpus_per_actor, gpus_per_actor, provider, actors, batch_size, shard_size)
    ex = model if isinstance(model, Explainer) else Explainer(model, preset=preset)
    if memory_budget:
        ex.engine.memory_budget = memory_budget
    names = [get_method(m).name for m in methods]
    options = dict(options or {})
    specs = layer if isinstance(layer, (list, tuple)) else [layer]
    if any(get_method(m).uses_layer for m in names):
        for spec in specs:
            ex.resolve_layer(spec)
    ray = _ray()
    paths = _paths_of(source)
    rows = _rows_from_paths(paths, ex.targets(target, len(paths))) if paths is not None else None
    if rows is None and isinstance(target, (list, tuple)):
        raise SaliencyError("--target: one target per image needs a list of paths, or a 'target' column")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SaliencyError(f"--out {out}: exists and is not a folder")

    present = {}
    if fmt == "parquet":
        manifest = {"format": "onnx-saliency parquet 1", "model_sha256": ex.model.sha256, "methods": names,
                    "layer": specs, "options": options, "preprocessing": vars(ex.preprocessing)}
        parquet.check_manifest(out, manifest, resume)
        present, _ = parquet.committed(out)
    done = {i for i, ms in present.items() if set(names) <= ms}
    todo = [r for r in rows if r["id"] not in done] if rows is not None else None
    graphs = record_graphs(ex, names, layer, options, batch_size=1)  # model and option errors stop here
    if fmt == "parquet":
        parquet.write_manifest(out, manifest)
    shipment = Shipment(model=_shipped_model(ex.model), preprocessing=ex.preprocessing, graphs=graphs,
                        methods=names, layer=layer, options=options, out=str(out), fmt=fmt,
                        batch_size=batch_size, max_pixels=max_pixels, memory_budget=ex.engine.memory_budget,
                        provider=provider, threads=max(1, int(round(cpus_per_actor))), resume=resume,
                        done=frozenset(done) if rows is None else frozenset(),
                        present={i: sorted(ms) for i, ms in present.items() if i not in done},
                        images=len(rows) if rows is not None else None)

    we_started = not ray.is_initialized()
    if we_started:
        _init_quietly(ray, address=address)  # None: a local cluster of this machine's cores
    try:  # else this process is already connected (a driver has one cluster), and stays so
        _quiet_ray_data(ray)
        outcome = ScaleOutcome(images=len(rows) if rows is not None else 0)
        actors = actors or _default_actors(ray, cpus_per_actor, gpus_per_actor)
        ref = ray.put(shipment)
        if rows is not None:
            outcome.resumed = len(rows) - len(todo)
            blocks = min(len(todo), math.ceil(len(todo) / shard_size))
            actors = max(1, min(actors, blocks))  # an actor without a shard would only cost its start
            ds = ray.data.from_items(todo, override_num_blocks=blocks) if todo else None
        else:
            ds = _normalised(source, int(ex.targets(target, 1)[0]))
        outcome.actors = actors
        on_start(outcome.images)
        if outcome.resumed:
            on_progress(outcome.resumed)
        outcome.setup_seconds = time.perf_counter() - started
        run_start = time.perf_counter()
        if ds is not None:
            results = ds.map_batches(ExplainShard, batch_size=shard_size, batch_format="numpy",
                                     compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                                     num_gpus=gpus_per_actor or None, fn_constructor_args=([ref],))
            _drain(results, outcome, on_failure, on_progress)
        outcome.seconds = time.perf_counter() - run_start
        if fmt == "parquet":
            present, recorded = parquet.committed(out)
            outcome.failed = {f["id"]: f for f in parquet.write_errors(out, recorded, present, names)}
        if rows is None:
            outcome.images = outcome.written + outcome.resumed + len(outcome.failed)
        return outcome
    finally:
        if we_started:
            ray.shutdown()


def _check_numbers(fmt, cpus_per_actor, gpus_per_actor, provider, actors, batch_size, shard_size) -> int:
    """Option checks before any work; returns the shard size."""
    if fmt not in FORMATS:
        raise SaliencyError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if cpus_per_actor <= 0:
        raise SaliencyError(f"--cpus-per-actor {cpus_per_actor}: must be positive")
    if gpus_per_actor < 0:
        raise SaliencyError(f"--gpus-per-actor {gpus_per_actor}: must be 0 or more")
    if gpus_per_actor > 0 and provider != "cuda":
        raise SaliencyError("--gpus-per-actor: GPUs are only used with --provider cuda")
    if actors is not None and actors < 1:
        raise SaliencyError(f"--actors {actors}: must be at least 1")
    if batch_size < 1:
        raise SaliencyError(f"--batch-size {batch_size}: must be at least 1")
    if shard_size is not None and shard_size < 1:
        raise SaliencyError(f"--shard-size {shard_size}: must be at least 1")
    if fmt == "parquet":
        parquet.schema()  # pyarrow is there
    return shard_size or max(batch_size, 64)


def _default_actors(ray, cpus_per_actor: float, gpus_per_actor: float) -> int:
    """As many actors as the cluster's CPUs (and GPUs, with --gpus-per-actor) hold."""
    cluster = ray.cluster_resources()
    actors = max(1, int(cluster.get("CPU", 1) // cpus_per_actor))
    if gpus_per_actor > 0:
        actors = max(1, min(actors, int(cluster.get("GPU", 0) // gpus_per_actor) or 1))
    return actors


def _quiet_ray_data(ray) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is on stderr, one line
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors reach us as rows or exceptions


def _normalised(ds, target: int):
    """A user's dataset -> the rows ExplainShard reads: id, path, target and the image or bytes column."""
    cols = set(ds.columns() or [])
    if not cols & {"image", "bytes"} or not cols & {"id", "path"}:
        raise SaliencyError(f"the dataset needs an 'image' or 'bytes' column and an 'id' or 'path' column; it has "
                            f"{', '.join(sorted(cols)) or 'none'}")
    return ds.map_batches(_normalise, batch_format="numpy", fn_kwargs={"target": target})


def _normalise(batch: dict, target: int) -> dict:
    import numpy as np

    n = len(next(iter(batch.values())))
    path = batch.get("path")
    paths = [str(p) for p in path] if path is not None else [""] * n
    ids = [str(i) for i in batch["id"]] if "id" in batch else [Path(p).stem for p in paths]
    out = {"id": np.array(ids, object), "path": np.array(paths, object),
           "target": np.asarray(batch["target"], np.int64) if "target" in batch else np.full(n, target, np.int64)}
    for key in ("image", "bytes"):
        if key in batch:
            out[key] = batch[key]
    return out


def _drain(results, outcome, on_failure, on_progress) -> None:
    """Stream the shards' summary rows back to the driver: progress, failures, and stop on a fatal row."""
    try:
        with warnings.catch_warnings():  # Ray Data's tuning hints are for its own users, not ours
            warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.")
            for row in results.iter_rows():
                _collect(outcome, row, on_failure, on_progress)
    except SaliencyError:
        raise
    except Exception as err:  # a crash in an actor (a bug, or the actor killed): its last line
        raise SaliencyError(f"the Ray job failed: {_last_error_line(err)}") from err


class _Fatal(SaliencyError):
    """An actor's fatal row, re-raised on the driver with the actor's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _collect(outcome: ScaleOutcome, row: dict, on_failure, on_progress) -> None:
    if row.get("fatal"):
        raise _Fatal(str(row["fatal"]), int(row["exit_code"]) or 2)
    failures = json.loads(row["failures"])
    for f in failures:
        outcome.failed[f["id"]] = f
        on_failure(f["error"])
    outcome.written += int(row["written"])
    outcome.resumed += int(row["resumed"])
    outcome.constant += json.loads(row["constant"])
    for method, note in json.loads(row["notes"]):
        if (method, note) not in outcome.notes:
            outcome.notes.append((method, note))
    outcome.graph_misses += int(row["graph_misses"])
    outcome.shards.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()
                           if k not in ("failures", "constant", "notes")})
    on_progress(int(row["images"]))


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` or start a local cluster (`num_cpus`, default all), as explain_dataset does."""
    _init_quietly(_ray(), address, num_cpus)


def _init_quietly(ray, address, num_cpus=None) -> None:
    """ray.init without Ray's own log lines on the user's terminal around our progress bar and error lines.

    The driver's C++ core worker logs to this process's stderr: at actor creation Ray Data's own
    constructor arguments trigger an ERROR line (ray-project/ray#53727) that is not ours to act on, so its
    level is raised to fatal (what the actors meet reaches us as exceptions); setting that level prints one
    line of its own during init, which goes to /dev/null with the rest of init's chatter. Python-side
    errors of init are exceptions and still reach the user."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
