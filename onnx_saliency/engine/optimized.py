"""onnxruntime's optimised graphs, kept with the rewritten graphs in the persistent cache (CPU only).

At its default level onnxruntime rewrites a graph when a session is made: on ResNet-50's Grad-CAM graph the
NCHWc layout pass alone takes 0.1 s (the convolution weights reordered into blocks), as long as the rest of a
warm run. With a cache, the engine has onnxruntime save what it made of a graph (``optimized_model_filepath``,
in a session dropped at once) and runs the saved graph, with optimisation off, in this process and the next:
the cold run pays the optimisation once (plus writing what it changed), every later run only maps it, and both
hold a single session's memory (the weights onnxruntime changed are file-mapped, not copied).

What is saved: the optimised graph, and one weight file holding only the weights onnxruntime changed (reordered
convolution weights, folded constants) or the rewrite derived. The model's own weights that only MatMul/Gemm
read are handed to the saving session as graph inputs, so onnxruntime does not write them at all (VGG-16's dense
weights: 470 MB), and a weight it kept as it was, byte for byte (checked when saving), is a reference to the
model's own weight instead: both are read from the model file as always. The layout depends on the CPU (vector
width) and the onnxruntime version, both in the cache key. The weight file is trusted by its identity (any
write to it changes it; see GraphCache.load_optimized).
"""

from __future__ import annotations

import functools
import hashlib
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from graph_passes._graph import WeightStore, placeholder_ref

from .cache import SAVING_PREFIX

MODEL_REF = "onnx-saliency-model:"  # location of a weight kept as the model's own (then: its store key)
WEIGHTS_REF = "weights"  # location of a weight in the entry's weight file (offset, length)
_ALIGN = 64


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


def save(source, key, graph: onnx.ModelProto, store: WeightStore, options) -> None:
    """Save onnxruntime's optimisation of `graph` (placeholders in `store`; edited) into `source` for `key`.
    Failures only lose the entry (the caller then builds its session the usual way)."""
    import onnxruntime as ort

    from graph_passes._graph import ort_model

    own = {t.name: ref[1] for t in graph.graph.initializer
           if (ref := placeholder_ref(t)) is not None and not ref[1].startswith("derived/")}
    held_out = _hold_out(graph, own, store)
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
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])  # written, then freed
        del data
        saved = onnx.load(str(tmp / "m.onnx"), load_external_data=False)
        _put_back(saved, held_out)
        kept = tmp / "kept.bin"
        _relink(saved, tmp / "m.bin", kept, own, store)
        source.save_optimized(cache_key(key), saved.SerializeToString(), kept)
    except Exception:  # noqa: BLE001 - a cache that cannot be written is only a slower next run
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hold_out(graph: onnx.ModelProto, own: dict, store: WeightStore) -> dict:
    """Turn the model's own file-mapped weights that only MatMul/Gemm read (as their second operand, where
    onnxruntime leaves a weight as it is) into graph inputs, in place, so that onnxruntime does not write them
    out again (VGG-16's dense weights: 470 MB); returns {name: (store key, the placeholder)}."""
    readers: dict = {}
    for node in graph.graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, k))
    held = {}
    for t in list(graph.graph.initializer):
        key = own.get(t.name)
        uses = readers.get(t.name, [])
        if key is None or key not in store.files or not uses or any(
                op not in ("MatMul", "Gemm") or k != 1 for op, k in uses):
            continue
        held[t.name] = (key, onnx.TensorProto.FromString(t.SerializeToString()))
        graph.graph.initializer.remove(t)
        graph.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return held


def _put_back(saved: onnx.ModelProto, held: dict) -> None:
    """The weights _hold_out made inputs, initializers again: references to the model's own weights."""
    for vi in [vi for vi in saved.graph.input if vi.name in held]:
        saved.graph.input.remove(vi)
        key, placeholder = held[vi.name]
        t = onnx.TensorProto(name=vi.name, data_type=placeholder.data_type, dims=placeholder.dims,
                             data_location=onnx.TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=MODEL_REF + key)
        saved.graph.initializer.append(t)


def _relink(saved: onnx.ModelProto, written: Path, kept: Path, own: dict, store: WeightStore) -> None:
    """Point every weight of `saved` that equals the model's own weight of the same name at that weight, in
    place; the others stay in a weight file at `kept`: `written` (onnxruntime's) itself when the relinked
    weights are a small part of it, else a copy of only the others."""
    external = [t for t in saved.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                and not any(e.key == "location" and e.value.startswith(MODEL_REF) for e in t.external_data)]
    if not written.exists():  # onnxruntime wrote no weight file: nothing it kept was large
        kept.touch()
        return
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
    if sum(places[n][1] for n in relinked) * 4 < written.stat().st_size:  # keep onnxruntime's file as it is
        written.replace(kept)
        moved = {n: places[n][0] for n in places}
    else:  # VGG-16: the dense weights are most of it
        moved = {}
        with open(written, "rb") as src, open(kept, "wb") as dst:
            for t in external:
                if t.name in relinked:
                    continue
                dst.write(b"\0" * (-dst.tell() % _ALIGN))
                moved[t.name] = dst.tell()
                offset, length = places[t.name]
                src.seek(offset)
                while length:
                    block = src.read(min(length, 16 << 20))
                    if not block:
                        raise OSError(f"{written}: short weight {t.name!r}")
                    dst.write(block)
                    length -= len(block)
    for t in external:
        if t.name not in relinked:
            for k, v in (("location", WEIGHTS_REF), ("offset", str(moved[t.name])),
                         ("length", str(places[t.name][1]))):
                t.external_data.add(key=k, value=v)


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
