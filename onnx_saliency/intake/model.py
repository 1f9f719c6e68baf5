"""Model intake: load, validate, canonicalise, and find the image input and the class-score tensor."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

import graph_passes as gp
from graph_passes._graph import (STORE_MIN_ELEMENTS, WeightStore, externalize, graph_inputs, is_file_backed, producers,
                                 skeleton, tensor_array, tensor_infos)
from graph_passes.precision import HALF

from ..errors import SaliencyError, UnsupportedModelError
from .. import prehash
from ..guard import file_identity, note_input
from ..ort_logging import quiet_onnxruntime
from .preprocess import Preprocessing, labels_from_metadata

MAX_MODEL_BYTES = 2 ** 31 - 1  # protobuf's own limit: larger models must keep weights as external data


@dataclass
class LoadedModel:
    path: Path
    sha256: str
    original: onnx.ModelProto
    canonical: onnx.ModelProto
    report: gp.CanonicalizeReport
    input_name: str            # the (canonical, NCHW) image input
    layout: str                # the layout the *original* model takes: NCHW or NHWC
    input_hw: tuple            # (H, W), None where dynamic
    channels: int
    output_name: str           # the graph output the user sees
    score_tensor: str          # the pre-softmax scores we explain
    num_classes: int
    metadata: dict = field(default_factory=dict)
    labels: list | None = None
    batch: int | None = None   # the image input's static batch (plain torch exports: 1); None where dynamic
    module_cache: dict | None = field(default=None, repr=False, compare=False)  # layers.module_paths
    notes: list = field(default_factory=list)  # what loading changed that changes the answer (said, recorded)
    # the large weights of `canonical` and `original`, each held once (graph_passes._graph.WeightStore)
    weights: WeightStore | None = field(default=None, repr=False, compare=False)

    def label(self, index: int) -> str:
        if self.labels and 0 <= index < len(self.labels):
            return str(self.labels[index])
        return str(index)

    @property
    def known(self) -> dict | None:
        """The manifest entry of a model we ship or test with, recognised by its sha256."""
        from ..models import lookup

        return lookup(self.sha256)

    def preprocessing(self) -> Preprocessing:
        """Defaults: the model's metadata keys, else its manifest entry, else torchvision at the input size.

        Always NCHW: canonicalisation absorbed any NHWC input transpose, so the engine feeds NCHW."""
        if any(k.startswith("onnx_saliency.") for k in self.metadata) or self.known is None:
            return Preprocessing.from_metadata(self.metadata, layout="NCHW", input_hw=self.input_hw)
        k = self.known
        return Preprocessing(preset=k["preset"], resize=k.get("resize"), crop=k.get("crop"),
                             resize_mode=k.get("resize_mode", "shorter"), layout="NCHW")


class _FileScan:
    """sha256 of a model file and the NaN check of its mapped weights, in one read on a second thread (hashlib,
    numpy and file reads release the GIL: on two cores the scan runs beside parsing and canonicalising the
    model; ResNet-50's 97 MB take 0.1 s). result() waits, and raises what the scan found."""

    def __init__(self, path: Path, digests=None):
        self.path = path
        self.digests = digests  # engine.cache.FileDigests: a file scanned before is not read again
        self.thread = None
        self.error: BaseException | None = None
        self.hexdigest: str | None = digests.get(path) if digests is not None else None

    def start(self, ranges) -> None:
        import threading

        if self.hexdigest is not None:  # this very file was hashed and found NaN-free before
            return

        def work():
            try:
                identity = _identity(self.path)  # before reading: a write meanwhile changes it
                early = prehash.take(self.path, identity)  # the command line began hashing it
                digest = hashlib.sha256() if early is None else None
                _scan_file(self.path, ranges, digest)
                self.hexdigest, identity = (digest.hexdigest(), identity) if early is None else early
                if self.digests is not None and identity is not None:
                    self.digests.put(self.path, identity, self.hexdigest)
            except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread by result()
                self.error = err

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def result(self) -> str:
        if self.thread is None:  # remembered, or read_model never got as far as the weights
            return self.hexdigest or sha256_of(self.path)
        self.thread.join()
        if self.error is not None:
            if isinstance(self.error, OSError):
                raise SaliencyError(f"{self.path}: cannot read ({self.error.strerror or self.error})") from None
            raise self.error
        return self.hexdigest


def _identity(path: Path):
    try:
        return file_identity(path)
    except OSError:
        return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    _scan_file(path, (), digest)
    return digest.hexdigest()


# Leading bytes of files people mistake for ONNX models, so the error says what the file is.
_FOREIGN_FORMATS = (
    (b"PK\x03\x04", "a zip archive: a PyTorch .pt/.pth, Keras .keras or NumPy .npz file?"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file: a Keras .h5 model?"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"GGUF", "a GGUF file"),
    (b"\x1f\x8b", "a gzip archive"),
)


def _foreign_format(head: bytes) -> str | None:
    """What a file that is certainly not a ModelProto is, from its first bytes; None when it may be ONNX."""
    if not head:
        return "an empty file"
    for magic, what in _FOREIGN_FORMATS:
        if head.startswith(magic):
            return what
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle: a PyTorch checkpoint?"
    if head[4:8] == b"TFL3":
        return "a TensorFlow Lite model"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # A ModelProto starts with field 1 (ir_version, tag 0x08) and holds binary lengths: plain text is not one.
    if "\x00" not in text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return None


def _location_escapes(location: str) -> bool:
    """True for absolute paths and '..' components, judged on the string alone (nothing is touched)."""
    parts = location.replace("\\", "/").split("/")
    drive = len(location) > 1 and location[1] == ":"  # C:\... written on Windows
    return os.path.isabs(location) or location.startswith(("/", "\\")) or drive or ".." in parts


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the raw data of `tensor` must have; None for types without a fixed size (strings)."""
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    if dtype.kind in "OSU":
        return None
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return (count * bits + 7) // 8 if bits else count * dtype.itemsize


def _external_entry(tensor: onnx.TensorProto, key: str) -> str | None:
    return next((e.value for e in tensor.external_data if e.key == key), None)


def _check_external_data(model: onnx.ModelProto, folder: Path, path: Path) -> int:
    """External tensors may only live inside the model's own folder; returns their total size in bytes.

    Absolute paths and '..' are refused from the string alone, symlinks by resolving the path: nothing
    outside the folder is ever opened, only stat'ed once its location is known to be inside it. Offsets
    and lengths are checked against the file size and the tensor's shape, before any data is read.

    Model-hub caches (Hugging Face: snapshots/REV/model.onnx and model.onnx_data are symlinks into a blobs
    folder beside the snapshots) are accepted by one more rule: where the model file is itself a symlink,
    data may also resolve into the folder the model's own bytes live in. That folder was chosen by whoever
    made the model's link, not by the model's contents, so it opens no way out to a hostile model.
    """
    root = folder.resolve()
    roots = {root, path.resolve().parent}
    total = 0
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        name = tensor.name
        location = _external_entry(tensor, "location")
        if not location:
            raise SaliencyError(f"{path}: external data of tensor {name!r} has no location")
        outside = SaliencyError(f"{path}: external data of tensor {name!r} points outside the model folder "
                                f"({location!r}); refusing to read it")
        if "\x00" in location or _location_escapes(location):
            raise outside
        target = (folder / location).resolve()
        if not any(target.is_relative_to(r) for r in roots):  # a symlink (file or folder on the way) leading out
            raise outside
        note_input(target)  # never written over by this run's outputs
        if not target.is_file():
            raise SaliencyError(f"{path}: external data file {location!r} of tensor {name!r} is missing")
        try:
            offset = int(_external_entry(tensor, "offset") or 0)
            length = _external_entry(tensor, "length")
            size = target.stat().st_size
            length = size - offset if length is None else int(length)
        except ValueError:
            raise SaliencyError(f"{path}: external data of tensor {name!r} has a non-integer offset or "
                                "length") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise SaliencyError(f"{path}: external data of tensor {name!r} needs bytes {offset}..{offset + length} "
                                f"of {location!r}, which has {size} bytes")
        expected = _tensor_nbytes(tensor)
        if expected is not None and expected != length:
            raise SaliencyError(f"{path}: external data of tensor {name!r} has {length} bytes in {location!r}; "
                                f"its shape {list(tensor.dims)} needs {expected}")
        total += length
    return total


def _load_checked_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Read external tensors whose locations, offsets and lengths `_check_external_data` has accepted."""
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        offset = int(_external_entry(tensor, "offset") or 0)
        length = _external_entry(tensor, "length")
        with open((folder / _external_entry(tensor, "location")).resolve(), "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read() if length is None else f.read(int(length))
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _check_weights(model: onnx.ModelProto, path: Path, below: int | None = None, skip_mapped: bool = False) -> None:
    """Every weight's data must fill its declared shape (the checker does not look); NaN weights poison every
    map and are refused, Inf is allowed (exporters pad max-pools with -inf). `below`: only tensors with fewer
    elements (the larger ones are checked as they move into the weight store, without a second copy)."""
    for tensor in external_data_helper._get_all_tensors(model):
        if below is not None and int(np.prod(tensor.dims, dtype=np.int64)) >= below:
            continue
        if skip_mapped and is_file_backed(tensor):  # read_model checked it from the file
            continue
        try:
            values = tensor_array(tensor)
        except Exception as err:  # ValueError from reshape, TypeError/KeyError for unknown data types...
            raise SaliencyError(f"{path}: weight {tensor.name!r} does not hold data of its declared shape "
                                f"{list(tensor.dims)} and type ({type(err).__name__}: {err})") from None
        if values.dtype.kind == "f" and not np.isfinite(values.sum(dtype=np.float64)) and np.isnan(values).any():
            raise SaliencyError(f"{path}: weight {tensor.name!r} contains NaN ({int(np.isnan(values).sum())} of "
                                f"{values.size} values)")


def _non_utf8_string(message) -> str | None:
    """The first string field whose bytes are not UTF-8 (protobuf then hands out bytes, not str), as text.
    Bytes fields (weights' raw data) are never read: reading one copies it."""
    from google.protobuf.descriptor import FieldDescriptor as F

    for field_desc in message.DESCRIPTOR.fields:
        if field_desc.type not in (F.TYPE_MESSAGE, F.TYPE_STRING):
            continue
        repeated = field_desc.is_repeated if hasattr(field_desc, "is_repeated") else field_desc.label == 3
        if repeated:
            values = getattr(message, field_desc.name)
        elif field_desc.type == F.TYPE_MESSAGE:
            values = [getattr(message, field_desc.name)] if message.HasField(field_desc.name) else []
        else:
            values = [getattr(message, field_desc.name)]
        if field_desc.type == F.TYPE_MESSAGE:
            for item in values:
                found = _non_utf8_string(item)
                if found:
                    return found
        else:
            bad = next((v for v in values if isinstance(v, bytes)), None)
            if bad is not None:
                return f"{message.DESCRIPTOR.name}.{field_desc.name} {bad[:40]!r}"
    return None


def read_model(path, check_weights: bool = True, weights: WeightStore | None = None,
               scan=None) -> onnx.ModelProto:
    """Parse and check an ONNX file (never writing to it); external data is read from its folder only.
    check_weights=False leaves the weights' values to the caller (load_model checks them in its store).
    weights: a store that keeps the file's large weights as memory maps of the file, never read into the
    protobuf (the model returned holds placeholders for them). scan: called with the [(name, offset, length,
    dtype)] of those weights, which it then checks for NaN itself (load_model: while hashing the file)."""
    path = Path(path)
    if not path.is_file():
        raise SaliencyError(f"{path}: no such model file")
    note_input(path)  # never written over by this run's outputs
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise SaliencyError(f"{path}: cannot read ({err.strerror or err})") from None
    foreign = _foreign_format(head)
    if foreign:
        raise SaliencyError(f"{path}: not a readable ONNX model ({foreign})")
    if size > MAX_MODEL_BYTES:
        raise SaliencyError(f"{path}: {size} bytes, over protobuf's 2 GiB limit; models this large must keep "
                            "their weights as external data")
    found: dict = {}
    model = None
    if weights is not None:  # the structure alone; large weights stay in the file (see intake.wire)
        from .wire import WireError, read_structure

        try:
            model, found = read_structure(path, STORE_MIN_ELEMENTS)
        except (WireError, OSError, ValueError, Exception):  # noqa: B014 - anything: the ordinary parse decides
            model, found = None, {}
    try:
        model = model if model is not None else onnx.load(str(path), load_external_data=False)
    except OSError as err:
        raise SaliencyError(f"{path}: cannot read ({err.strerror or err})") from None
    except Exception as err:  # protobuf's DecodeError and friends, whatever the runtime raises
        raise SaliencyError(f"{path}: not a readable ONNX model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'parse error'})") from None
    if not model.graph.node:
        raise SaliencyError(f"{path}: not an ONNX model (no graph nodes)")
    text = _non_utf8_string(model)
    if text:
        raise SaliencyError(f"{path}: not a readable ONNX model (a name or string that is not UTF-8: {text})")
    external = _check_external_data(model, path.parent, path)
    if external:
        if size + external > MAX_MODEL_BYTES:
            raise SaliencyError(f"{path}: {size + external} bytes with its external data; models over 2 GiB are "
                                "not supported (the ONNX checker and shape inference need the whole graph in one "
                                "protobuf, which is limited to 2 GiB)")
        try:
            if path.is_symlink():  # a model-hub snapshot: onnx refuses symlinked data, checked above instead
                _load_checked_external_data(model, path.parent)
            else:
                external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as err:  # onnx re-checks paths and bounds itself; its message names the tensor
            raise SaliencyError(f"{path}: cannot read external data ({str(err).splitlines()[0]})") from None
    try:
        # the structure is checked on the weight-free skeleton (fast on big models); _check_weights then
        # checks every weight's data against its declared shape, which the checker would have done
        onnx.checker.check_model(skeleton(model))
    except Exception as err:
        raise SaliencyError(f"{path}: invalid ONNX model: {str(err) or type(err).__name__}") from err  # one line
    ranges = []
    for index, (offset, length) in found.items():
        t = model.graph.initializer[index]
        ranges.append((t.name, offset, length, onnx.helper.tensor_dtype_to_np_dtype(t.data_type)))
        model.graph.initializer[index].CopyFrom(weights.put_file(t.name, path, offset, ranges[-1][3], t.dims,
                                                                 t.name))
    if scan is not None:
        scan(ranges)
    else:
        _scan_file(path, ranges, None)
    if check_weights:
        _check_weights(model, path)
    return model


_BLOCK = 64 << 20


def _scan_file(path: Path, ranges, digest) -> None:
    """One sequential read of `path`: every block updates `digest` (a hashlib object, or None: then only the
    weights' bytes are read) and the float weights among `ranges` [(name, offset, length, dtype)] are checked
    for NaN (read through the page cache, never through a mapping of ours that would stay resident). Blocks end
    on a value boundary of the weight they end in, so no value is split. Raises SaliencyError naming the weight."""
    floats = sorted(((name, offset, length, np.dtype(dtype)) for name, offset, length, dtype in ranges
                     if np.dtype(dtype).kind == "f"), key=lambda r: r[1])
    if digest is None and not floats:
        return
    bad: dict[str, int] = {}
    with open(path, "rb", buffering=0) as f:
        pos = 0 if digest is not None else floats[0][1]
        end = None if digest is not None else max(o + n for _, o, n, _ in floats)
        # one buffer, read into again and again (no fresh pages per block), no larger than what is read
        buffer = memoryview(bytearray(min(_BLOCK, (end if end is not None else os.fstat(f.fileno()).st_size) - pos)
                                      or 1))
        f.seek(pos)
        k = 0
        while end is None or pos < end:
            stop = pos + _BLOCK if end is None else min(pos + _BLOCK, end)
            inside = next((r for r in floats[k:] if r[1] < stop < r[1] + r[2]), None)
            if inside is not None:
                stop -= (stop - inside[1]) % inside[3].itemsize
            block = buffer[:f.readinto(buffer[:stop - pos])]
            if not block:
                break
            if digest is not None:
                digest.update(block)
            stop = pos + len(block)
            while k < len(floats) and floats[k][1] + floats[k][2] <= pos:
                k += 1
            for name, offset, length, dtype in floats[k:]:
                if offset >= stop:
                    break
                lo, hi = max(offset, pos), min(offset + length, stop)
                values = np.frombuffer(block, dtype, (hi - lo) // dtype.itemsize, lo - pos)
                if np.isnan(values.max()):  # max propagates NaN (and is the fastest full pass numpy has)
                    bad[name] = bad.get(name, 0) + int(np.isnan(values).sum())
            pos = stop
    for name, offset, length, dtype in floats:
        if bad.get(name):
            raise SaliencyError(f"{path}: weight {name!r} contains NaN ({bad[name]} of {length // dtype.itemsize} "
                                "values)")


def _find_image_input(model: onnx.ModelProto, path: Path):
    candidates = []
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        # float16 / bfloat16 inputs are computed in float32 (canonicalize, graph_passes.precision)
        if vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, *HALF) and len(dims) == 4:
            candidates.append(vi)
    if len(candidates) != 1:
        names = [vi.name for vi in graph_inputs(model)]
        raise SaliencyError(f"{path}: expected exactly one 4-D float image input, found inputs {names}")
    return candidates[0]


def _score_tensor(model: onnx.ModelProto, path: Path) -> tuple[str, str, int]:
    outputs = [o for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not outputs:
        raise SaliencyError(f"{path}: the model has no float output to explain")
    out = outputs[0]
    prod = producers(model.graph)
    score = out.name
    node = prod.get(score)
    # explain what the classifier computes before normalising into probabilities
    while node is not None and node.op_type in ("Softmax", "LogSoftmax", "Identity"):
        score = node.input[0]
        node = prod.get(score)
    info = tensor_infos(model).get(score)
    if info is None or info.shape is None or len(info.shape) != 2 or info.shape[1] is None:
        shape = None if info is None else info.shape
        raise SaliencyError(f"{path}: class scores {score!r} must have shape (N, classes), got {shape}")
    return out.name, score, int(info.shape[1])


def unsupported_nodes(model: onnx.ModelProto, output: str, image_input: str, rules=None) -> list[tuple[str, str]]:
    """Nodes on a differentiable path from the image input to the scores that no backward rule covers; what
    does not depend on the image (constants folding left, shape arithmetic) runs but is never differentiated."""
    ops = gp.supported_ops(rules)
    return [(n.name, n.op_type) for n in gp.vjp.differentiable_path(model, [image_input], output)
            if n.op_type not in ops]


def release_freed_memory() -> None:
    """Return the heap freed by a graph rewrite to the OS. The graph-surgeon passes leave reference cycles
    (collected here at once, not at some later GC run) and glibc keeps freed pages: without this a 500 MB
    model's transient copies stay resident for the life of the process. The trim is a no-op off glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_model(path, fuse_affine: bool = False, digests=None) -> LoadedModel:
    """fuse_affine: also fold bias Adds, MatMul heads and per-channel scale/shift into their layers (audits).
    digests: an engine.cache.FileDigests remembering the sha256 (and clean NaN check) of files read before."""
    path = Path(path)
    scan = _FileScan(path, digests)
    # from here on every large weight is held once, in `weights`; the graphs hold placeholders for them, so
    # canonicalisation and every rewrite after it copy and serialise structure only
    weights = WeightStore()
    try:
        return _load_read_model(path, read_model(path, check_weights=False, weights=weights, scan=scan.start),
                                weights, scan, fuse_affine)
    except Exception:
        if scan.thread is not None:
            scan.result()  # a NaN weight (or unreadable file) is the error to report, whatever failed after it
        raise


def _load_read_model(path: Path, model, weights: WeightStore, scan: "_FileScan", fuse_affine: bool) -> LoadedModel:
    _check_weights(model, path, below=STORE_MIN_ELEMENTS)
    try:
        original = externalize(model, weights, STORE_MIN_ELEMENTS)
    except Exception:
        _check_weights(model, path)  # the weight whose data does not fill its shape, named as read_model does
        raise
    del model
    _check_weights(original, path, skip_mapped=True)  # the stored ones, in place (file-mapped ones: checked)
    release_freed_memory()
    image = _find_image_input(original, path)
    dims = image.type.tensor_type.shape.dim
    quiet_onnxruntime()  # constant folding runs onnxruntime sessions of onnx-graphsurgeon's
    inference, notes = inference_mode_batchnorm(original, path)
    try:
        canonical, report = gp.canonicalize(inference, fuse_affine=fuse_affine, return_report=True)
    except gp.GraphPassError as err:
        raise SaliencyError(f"{path}: {err}") from err
    canonical = externalize(canonical, weights)  # weights canonicalize computed (folded BatchNorms, constants)
    weights.pin(canonical)
    release_freed_memory()
    output_name, score, classes = _score_tensor(canonical, path)
    missing = unsupported_nodes(canonical, score, image.name)
    if missing:
        raise UnsupportedModelError(f"{path}: unsupported op(s) in {len(missing)} node(s): "
                                    f"{gp.summarize_nodes(missing)}")
    layout = "NHWC" if report.absorbed_transpose else _guess_layout(dims)
    if layout == "NHWC" and not report.absorbed_transpose:
        raise UnsupportedModelError(f"{path}: NHWC input {image.name!r} is not followed by a single "
                                    "Transpose(perm=[0,3,1,2]); cannot map it to NCHW")
    cdims = _find_image_input(canonical, path).type.tensor_type.shape.dim
    static = [d.dim_value if d.HasField("dim_value") else None for d in cdims]
    metadata = {p.key: p.value for p in original.metadata_props}
    return LoadedModel(path=path, sha256=scan.result(), original=original, canonical=canonical, report=report,
                       input_name=image.name, layout=layout, input_hw=(static[2], static[3]),
                       channels=static[1] or 3, output_name=output_name, score_tensor=score, num_classes=classes,
                       metadata=metadata, labels=labels_from_metadata(metadata), batch=static[0] or None,
                       notes=notes, weights=weights)


def inference_mode_batchnorm(model: onnx.ModelProto, path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """BatchNormalization with training_mode=1 normalises by the statistics of the batch it is given, so an
    image's map would depend on which other images share its batch. Such nodes are run in inference mode
    (their running mean and variance), with a note; refused when something reads their running-statistics
    outputs (the graph then needs training mode). Returns `model` itself when no node is in training mode."""
    training = [n for n in model.graph.node if n.op_type == "BatchNormalization"
                and any(a.name == "training_mode" and a.i for a in n.attribute)]
    if not training:
        return model, []
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in training:
        used = [o for o in node.output[1:] if o and o in read]
        if used:
            raise UnsupportedModelError(f"{path}: BatchNormalization {node.name or node.output[0]!r} runs in "
                                        f"training mode and its running statistics ({', '.join(used)}) are used "
                                        "by the graph; export the model in eval mode")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = []
    for node in out.graph.node:
        if node.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in node.attribute):
            kept = [a for a in node.attribute if a.name != "training_mode"]
            del node.attribute[:]
            node.attribute.extend(kept)
            del node.output[1:]
            names.append(node.name or node.output[0])
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return out, [f"{path.name}: {len(names)} BatchNormalization node(s) in training mode ({shown}), which "
                 "normalise by the statistics of each batch; explained in inference mode with their running "
                 "mean and variance, so a map does not depend on the other images in its batch"]


def _guess_layout(dims) -> str:
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if values[1] in (1, 3) or values[3] not in (1, 3):
        return "NCHW"
    return "NHWC"
