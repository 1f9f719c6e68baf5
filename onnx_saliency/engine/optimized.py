"""onnxruntime's optimised graphs, kept with the rewritten graphs in the persistent cache (CPU only).

At its default level onnxruntime rewrites a graph when a session is made: on ResNet-50's Grad-CAM graph the
NCHWc layout pass alone takes 0.1 s (the convolution weights reordered into blocks), as long as the rest of a
warm run. A session whose graph came from the cache saves what onnxruntime made of it
(``optimized_model_filepath``) on a background thread, and later processes load that, with optimisation off.

What is saved: the optimised graph, and one weight file holding only the weights onnxruntime changed (reordered
convolution weights, folded constants) or the rewrite derived. A weight it kept as it was, byte for byte (checked
when saving), is a reference to the model's own weight instead, read from the model file as always: VGG-16's
dense weights are not written again. The layout depends on the CPU (vector width) and the onnxruntime version,
both in the cache key. The weight file is trusted by its sha256, checked again whenever its identity changed.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx

from graph_passes._graph import WeightStore, placeholder_ref

from .cache import SAVING_PREFIX

MODEL_REF = "onnx-saliency-model:"  # location of a weight kept as the model's own (then: its store key)
WEIGHTS_REF = "weights"  # location of a weight in the entry's weight file (offset, length)
_ALIGN = 64
_SAVERS: list[threading.Thread] = []


@functools.lru_cache(maxsize=1)
def runtime_fingerprint() -> str:
    """onnxruntime version and what of the CPU decides the optimised layout (architecture, feature flags)."""
    import onnxruntime as ort

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        flags = platform.processor()
    return f"onnxruntime {ort.__version__} {platform.machine()} {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def cache_key(key) -> tuple:
    return ("onnxruntime-optimized", key, runtime_fingerprint())


def load(graph: onnx.ModelProto, weights_file: Path, store: WeightStore, entry: str) -> onnx.ModelProto:
    """The optimised `graph` of a cache entry with its weights as placeholders in `store`: the model's own by
    key, the others memory-mapped from `weights_file` (keys under derived/, dropped with the session)."""
    for t in graph.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if loc.startswith(MODEL_REF):
            t.CopyFrom(store.placeholder(t.name, loc[len(MODEL_REF):]))
        elif loc == WEIGHTS_REF:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            t.CopyFrom(store.put_file(t.name, weights_file, int(info["offset"]), dtype, t.dims,
                                      f"derived/optimized/{entry}/{t.name}"))
        else:
            raise ValueError(f"unexpected weight location {loc!r}")
    return graph


def save_in_background(source, key, graph: onnx.ModelProto, store: WeightStore, options) -> None:
    """Save onnxruntime's optimisation of `graph` (placeholders in `store`) into `source` on a thread of its
    own; the process waits for it when it ends (a non-daemon thread). Failures only lose the entry."""
    worker = threading.Thread(target=_save, args=(source, key, graph, store, options), name="onnx-saliency-save")
    worker.start()
    _SAVERS.append(worker)


def wait_for_savers() -> None:
    """Wait for the background saves started so far (tests, and callers about to read the cache folder)."""
    while _SAVERS:
        _SAVERS.pop().join()


def _save(source, key, graph: onnx.ModelProto, store: WeightStore, options) -> None:
    import onnxruntime as ort

    from graph_passes._graph import ort_model

    own = {t.name: ref[1] for t in graph.graph.initializer
           if (ref := placeholder_ref(t)) is not None and not ref[1].startswith("derived/")}
    folder = Path(source.folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=SAVING_PREFIX, dir=folder))
    except OSError:
        return
    try:
        options.optimized_model_filepath = str(tmp / "m.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "m.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "4096")
        options.intra_op_num_threads = 1
        data, _ = ort_model(graph, options, store)
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        del data
        saved = onnx.load(str(tmp / "m.onnx"), load_external_data=False)
        kept = tmp / "kept.bin"
        digest = _relink(saved, tmp / "m.bin", kept, own, store)
        source.save_optimized(cache_key(key), saved.SerializeToString(), kept, digest)
    except Exception:  # noqa: BLE001 - a cache that cannot be written is only a slower next run
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _relink(saved: onnx.ModelProto, written: Path, kept: Path, own: dict, store: WeightStore) -> str:
    """Point every weight of `saved` that equals the model's own weight of the same name at that weight, in
    place; the others stay in a weight file at `kept`: `written` (onnxruntime's) itself when the relinked
    weights are a small part of it, else a copy of only the others. Returns the sha256 of `kept`."""
    external = [t for t in saved.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    places = {}
    with open(written, "rb") as src:
        for t in external:
            info = {e.key: e.value for e in t.external_data}
            places[t.name] = (int(info.get("offset", 0)), int(info["length"]))
        relinked = {t.name for t in external if (key := own.get(t.name)) is not None and key in store.arrays
                    and store.arrays[key].nbytes == places[t.name][1]
                    and _same_bytes(src, *places[t.name], store, key)}
    for t in external:
        del t.external_data[:]
        if t.name in relinked:
            t.external_data.add(key="location", value=MODEL_REF + own[t.name])
    digest = hashlib.sha256()
    if sum(places[n][1] for n in relinked) * 4 < written.stat().st_size:  # keep onnxruntime's file as it is
        with open(written, "rb") as src:
            for block in iter(lambda: src.read(16 << 20), b""):
                digest.update(block)
        written.replace(kept)
        moved = {n: places[n][0] for n in places}
    else:  # VGG-16: the dense weights are most of it
        moved = {}
        with open(written, "rb") as src, open(kept, "wb") as dst:
            for t in external:
                if t.name in relinked:
                    continue
                pad = b"\0" * (-dst.tell() % _ALIGN)
                dst.write(pad)
                digest.update(pad)
                moved[t.name] = dst.tell()
                offset, length = places[t.name]
                src.seek(offset)
                while length:
                    block = src.read(min(length, 16 << 20))
                    if not block:
                        raise OSError(f"{written}: short weight {t.name!r}")
                    dst.write(block)
                    digest.update(block)
                    length -= len(block)
    for t in external:
        if t.name not in relinked:
            for k, v in (("location", WEIGHTS_REF), ("offset", str(moved[t.name])),
                         ("length", str(places[t.name][1]))):
                t.external_data.add(key=k, value=v)
    return digest.hexdigest()


def _same_bytes(src, offset: int, length: int, store: WeightStore, key: str) -> bool:
    """Whether `length` bytes of `src` at `offset` equal the store's weight `key`, read in blocks (never
    through a mapping that would stay resident)."""
    file = store.files.get(key)
    mine = None if file is not None else memoryview(np.ascontiguousarray(store.arrays[key])).cast("B")
    theirs = open(file[0], "rb") if file is not None else None
    try:
        if theirs is not None:
            theirs.seek(file[1])
        src.seek(offset)
        done = 0
        while done < length:
            n = min(16 << 20, length - done)
            a = src.read(n)
            b = theirs.read(n) if theirs is not None else mine[done:done + n]
            if len(a) != n or a != b:
                return False
            done += n
        return True
    finally:
        if theirs is not None:
            theirs.close()
