"""What runs on each Ray actor: one Explainer and one onnxruntime session per graph, built once in
``__init__`` from what the driver put in the object store, then one shard of images per call.

Imports nothing from Ray at module level: the class is handed to ``Dataset.map_batches`` by the driver.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SaliencyError
from ..intake.preprocess import MAX_PIXELS, decode_image, load_image
from ..output.batch import explain_images
from ..output.sidecar import write_image_outputs
from .graphs import ShippedGraphs
from .parquet import ShardRows, commit_shard


@dataclass
class Shipment:
    """Everything an actor needs, put in the object store once by the driver."""

    model: object                  # LoadedModel, its original graph reduced to a weight-free skeleton
    preprocessing: object
    graphs: dict                   # engine key -> serialized rewritten graph
    methods: list
    layer: object
    options: dict
    out: str
    fmt: str                       # "files" | "parquet"
    batch_size: int = 16
    max_pixels: int = MAX_PIXELS
    memory_budget: int | None = None
    provider: str = "cpu"
    threads: int = 1
    resume: bool = False
    done: frozenset = frozenset()  # ids complete in earlier shards (sources the driver cannot filter itself)
    present: dict = field(default_factory=dict)  # id -> methods already committed, for partly done images
    images: int | None = None      # images in the whole run (None: a dataset, taken as many): the session tier


class ExplainShard:
    """The callable class of ``map_batches``: a batch of rows (id, path, target[, image | bytes]) in, one
    summary row out (counts, failures, timings, memory); the shard's outputs are written here."""

    def __init__(self, shipment_ref):
        import ray

        from ..explainer import Explainer

        started = time.perf_counter()
        s: Shipment = ray.get(shipment_ref[0])  # wrapped in a list so Ray hands over the reference unresolved
        self.s = s
        self.explainer = Explainer.from_loaded(s.model, s.preprocessing, provider=s.provider, threads=s.threads)
        if s.memory_budget:
            self.explainer.engine.memory_budget = s.memory_budget
        # the tier a local run of the same images gets (engine.session), so both write the same maps
        self.explainer.engine.expect_images(s.images if s.images is not None else 1 << 30)
        self.graphs = ShippedGraphs(s.graphs)
        self.explainer.engine.graph_source = self.graphs
        for key in s.graphs:  # every session now, once: the first shard's timing is the shard's own
            self.explainer.engine.session(key, _shipped_only)
        self.setup_s = time.perf_counter() - started
        self.first = True

    def __call__(self, batch: dict) -> dict:
        try:
            return self._shard(batch)
        except SaliencyError as err:
            # an error every image would meet (an output that cannot be written, a model error): a row that
            # says so, for the driver to stop on; Ray's own wrapping of exceptions loses their type and text
            return _row(fatal=str(err), exit_code=err.exit_code)

    def _shard(self, batch: dict) -> dict:
        started = time.perf_counter()
        s = self.s
        ids = [str(i) for i in batch["id"]]
        paths = [str(p) for p in batch["path"]]
        targets = np.asarray(batch["target"], np.int64)
        pixels = batch.get("image")
        encoded = batch.get("bytes")
        keep = [k for k, i in enumerate(ids) if i not in s.done]
        resumed = len(ids) - len(keep)
        names, seen, failures = [], {}, []
        for k in keep:
            name = Path(paths[k] or ids[k])  # the local engine's naming: outputs under the path's stem
            if name in seen:
                where = paths[k] or ids[k]
                failures.append({"id": ids[k], "path": paths[k], "error": f"{where}: duplicate id {ids[k]!r}"})
                continue
            seen[name] = k
            names.append(name)
        clock = {"decode": 0.0, "write": 0.0}

        def load(name):
            t = time.perf_counter()
            try:
                k = seen[name]
                where = paths[k] or ids[k]
                if pixels is not None:
                    return _as_rgb8(pixels[k], where)
                if encoded is not None:
                    return decode_image(encoded[k], where, s.max_pixels)
                return read_image(paths[k], s.max_pixels)
            finally:
                clock["decode"] += time.perf_counter() - t

        rows = ShardRows({n: (ids[k], paths[k]) for n, k in seen.items()}, s.present)
        writer = rows.write if s.fmt == "parquet" else write_image_outputs

        def write(*args):
            t = time.perf_counter()
            writer(*args)
            clock["write"] += time.perf_counter() - t

        outcome = explain_images(self.explainer, names, s.methods, Path(s.out), layer=s.layer,
                                 targets=targets[[seen[n] for n in names]] if names else targets[:0],
                                 batch_size=s.batch_size, options=s.options, max_pixels=s.max_pixels,
                                 resume=s.resume and s.fmt == "files", load=load, write=write)
        for name, reason in outcome.failed.items():
            k = seen[name]
            failures.append({"id": ids[k], "path": paths[k], "error": _original_name(reason, name, paths[k])})
        for name in outcome.partial:  # some methods written, some failed: reported with the image's failures
            k = seen[name]
            lost = "; ".join(f"-m {m}: {r.removeprefix(f'-m {m}: ')}" for (p, m), r in outcome.method_failed.items()
                             if p == name)
            failures.append({"id": ids[k], "path": paths[k], "error": f"{paths[k] or ids[k]}: {lost} (the other "
                                                                      "methods were written)"})
        shard = ""
        if s.fmt == "parquet":
            t = time.perf_counter()
            shard = commit_shard(Path(s.out), [ids[k] for k in keep], rows, failures).name
            clock["write"] += time.perf_counter() - t
        total = time.perf_counter() - started
        rss, peak = _memory()
        row = _row(shard=shard, images=len(ids), written=len(outcome.written),
                   resumed=resumed + len(outcome.resumed), failures=json.dumps(failures),
                   constant=json.dumps([[str(i), m, v] for i, m, v in outcome.constant]),
                   notes=json.dumps(outcome.notes), decode_s=clock["decode"], write_s=clock["write"],
                   explain_s=total - clock["decode"] - clock["write"], total_s=total,
                   setup_s=self.setup_s if self.first else 0.0, rss=rss, peak_rss=peak,
                   graph_misses=len(self.graphs.missed), started=time.time() - total)
        self.first = False
        self.graphs.missed.clear()
        return row


def _row(**values) -> dict:
    """One summary row, every column present (a fatal row too: blocks of one dataset share a schema)."""
    row = {"fatal": "", "exit_code": 0, "shard": "", "images": 0, "written": 0, "resumed": 0, "failures": "[]",
           "constant": "[]", "notes": "[]", "decode_s": 0.0, "write_s": 0.0, "explain_s": 0.0, "total_s": 0.0,
           "setup_s": 0.0, "pid": os.getpid(), "rss": 0, "peak_rss": 0, "graph_misses": 0, "started": 0.0,
           "finished": time.time()}
    unknown = set(values) - set(row)
    assert not unknown, unknown
    row.update(values)
    return {k: [v] for k, v in row.items()}


def _shipped_only(canonical):
    raise AssertionError("a shipped graph is served by the graph source, never built")  # engine.session's contract


def read_image(path: str, max_pixels: int) -> np.ndarray:
    """A local path, or a URI pyarrow can open (s3://, gs://, hdfs://, file://), decoded as load_image does."""
    if "://" not in path:
        return load_image(path, max_pixels=max_pixels)
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        size = filesystem.get_file_info(inner).size
        if size is not None and size > 32 * max_pixels + (64 << 20):
            raise SaliencyError(f"{path}: file of {size} bytes is too large for an image within the limit of "
                                f"{max_pixels} pixels")
        with filesystem.open_input_stream(inner) as f:
            data = f.read()
    except (OSError, ValueError) as err:  # pyarrow's errors for missing files and bad URIs are OSError/ValueError
        raise SaliencyError(f"{path}: cannot read ({str(err).splitlines()[0]})") from None
    return decode_image(data, path, max_pixels)


def _as_rgb8(image, where: str) -> np.ndarray:
    """A decoded image from a dataset column (e.g. ray.data.read_images): uint8 RGB, grey or RGBA."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise SaliencyError(f"{where}: image column holds {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise SaliencyError(f"{where}: image column holds shape {img.shape}, expected H x W x 3 (or 1, 4)")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _original_name(reason: str, name: Path, path: str) -> str:
    """explain_images names an image by its Path, which folds a URI's '//': say it as the user wrote it."""
    if path and str(name) != path and reason.startswith(str(name)):
        rest = reason[len(str(name)):]
        return rest[2:] if rest.startswith(": " + path) else path + rest
    return reason


def _memory() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process, from /proc where there is one."""
    try:
        status = Path("/proc/self/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0
