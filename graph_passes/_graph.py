"""Small helpers shared by the passes: copying, checking, shapes and graph topology on plain onnx protos."""

from __future__ import annotations

import hashlib
import itertools
import uuid
import weakref
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

# The backward rules emit ScatterElements(reduction="add"), Split with a `split` input and ReduceSum with
# an `axes` input, which need opset >= 16/13; older exports are upgraded once, in canonicalize.
MIN_OPSET = 17
# onnxruntime 1.31 loads IR <= 13; onnx.helper would otherwise stamp IR 14 on anything it builds.
MIN_IR = 8


class GraphPassError(ValueError):
    """A pass was asked for something the graph cannot give (unknown tensor, unsupported op...)."""


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


# Initializers above this many elements are checked by type and shape only (see skeleton()).
_SKELETON_MIN_ELEMENTS = 1 << 14


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every large initializer turned into a typed graph input.

    The checker and shape inference serialise the whole model; on VGG-16 that is 500 MB per call and made
    loading take a minute. Neither needs the weight values (only small ones, e.g. Reshape targets, feed
    data propagation), so they run on this weight-free copy with the same structure, types and shapes.
    """
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g, src = sk.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    listed = {vi.name for vi in src.input}
    for t in src.initializer:
        big = int(np.prod(t.dims)) >= _SKELETON_MIN_ELEMENTS or placeholder_ref(t) is not None
        if big and t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return sk


# --- weights held once, outside the protos --------------------------------------------------------------------
# A rewrite clones its input graph; with the weights inside the proto every clone, serialisation and session
# copies them (seconds and gigabytes on VGG-16). Loaded models therefore keep each large weight once, as a
# read-only numpy array in a WeightStore, and the graphs hold a *placeholder* in its place: an initializer with
# the weight's name, type and shape whose external-data location names the store and the key. Passes read
# values through tensor_array(); the engine hands the arrays to onnxruntime as shared OrtValues
# (SessionOptions.add_external_initializers: no copy); materialize() puts them back for files that leave us.

STORE_LOCATION = "onnx-saliency-store:"
STORE_MIN_ELEMENTS = 1 << 14  # smaller initializers stay in the graphs (shape inference may read their values)
_STORES: "weakref.WeakValueDictionary[str, WeightStore]" = weakref.WeakValueDictionary()


class WeightStore:
    """Large weights by key, each one read-only numpy array; graphs refer to them with placeholders."""

    def __init__(self):
        self.id = uuid.uuid4().hex
        self.arrays: dict[str, np.ndarray] = {}
        self._counter = itertools.count()
        self._ortvalues: dict = {}
        self.memo: dict = {}  # derived weights by digest of their values -> key (each kept once)
        self._own_digests: dict = {}
        self.files: dict = {}  # key -> (file, offset, length) of weights mapped from a file (put_file)
        _STORES[self.id] = self

    def __getstate__(self):  # ships to scale-out actors with its LoadedModel; OrtValues are per process
        return {"id": self.id, "arrays": self.arrays}

    def __setstate__(self, state):
        self.id, self.arrays = state["id"], state["arrays"]
        self._counter, self._ortvalues, self.memo = itertools.count(len(self.arrays)), {}, {}
        self._own_digests, self.files = {}, {}  # memory maps arrive as arrays: held in memory here
        _STORES.setdefault(self.id, self)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def placeholder(self, name: str, key: str) -> onnx.TensorProto:
        arr = self.arrays[key]
        t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype),
                             dims=arr.shape, data_location=onnx.TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=f"{STORE_LOCATION}{self.id}/{key}")
        return t

    def put(self, name: str, array: np.ndarray, key: str | None = None) -> onnx.TensorProto:
        """Keep `array` (not copied; made read-only) and return the placeholder initializer `name` for it."""
        key = key or f"derived/{next(self._counter)}"
        array = np.ascontiguousarray(array)
        array.flags.writeable = False
        self.arrays[key] = array
        return self.placeholder(name, key)

    def shared(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A placeholder for a derived weight, kept once however many graphs derive the same values (one hash,
        no copy); its key is dropped with the last session that uses it (see drop)."""
        array = np.ascontiguousarray(array)
        digest = _digest(array)
        key = self.memo.get(digest)
        if key is None:  # the model's own weight, computed again (LRP's "w" rules): the original is shared
            key = next((k for k, a in self.arrays.items() if not k.startswith("derived/") and a.shape == array.shape
                        and a.dtype == array.dtype and self._own_digest(k) == digest), None)
        if key is None or key not in self.arrays:
            key = self.put(name, array).external_data[0].value.rpartition(f"{self.id}/")[2]
            self.memo[digest] = key
        return self.placeholder(name, key)

    def _own_digest(self, key: str) -> tuple:
        """The digest of one of the model's own weights, computed once (only for same-shaped candidates)."""
        if key not in self._own_digests:
            self._own_digests[key] = _digest(self.arrays[key])
        return self._own_digests[key]

    def pin(self, model: onnx.ModelProto) -> None:
        """Make the derived weights `model` refers to the model's own (kept for good, under stable keys named
        after their tensors: a canonical graph's folded BatchNorms), in place."""
        moved: dict[str, str] = {}
        for t in model.graph.initializer:
            ref = placeholder_ref(t)
            if ref is None or ref[0] != self.id or not ref[1].startswith("derived/"):
                continue
            if ref[1] not in moved:  # one array may back several initializers (same values)
                key = f"model/{t.name}"
                while key in self.arrays:
                    key += "+"
                self.arrays[key] = self.arrays.pop(ref[1])
                self._ortvalues.pop(ref[1], None)
                moved[ref[1]] = key
            t.external_data[0].value = f"{STORE_LOCATION}{self.id}/{moved[ref[1]]}"
        self.memo = {d: moved.get(k, k) for d, k in self.memo.items()}

    def drop(self, keys) -> None:
        """Forget derived weights (never the model's own): their last session is gone."""
        keys = {k for k in keys if k.startswith("derived/")}
        for k in keys:
            self.arrays.pop(k, None)
            self._ortvalues.pop(k, None)
            self.files.pop(k, None)
        self.memo = {d: k for d, k in self.memo.items() if k not in keys}

    def put_file(self, name: str, path, offset: int, dtype, shape, key: str) -> onnx.TensorProto:
        """Keep a weight that lies in a file (bytes offset.. of `path`) as a read-only memory map of it: nothing
        is read until a pass asks for values, and onnxruntime maps the same bytes itself (ort_model)."""
        from pathlib import Path

        array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(int(d) for d in shape))
        self.arrays[key] = array
        self.files[key] = (Path(path).resolve(), int(offset), int(array.nbytes))
        return self.placeholder(name, key)

    def ortvalue(self, key: str):
        """One OrtValue per weight, shared by every session (onnxruntime reads the numpy memory itself)."""
        if key not in self._ortvalues:
            import onnxruntime as ort

            self._ortvalues[key] = ort.OrtValue.ortvalue_from_numpy(self.arrays[key])
        return self._ortvalues[key]


def _digest(array: np.ndarray) -> tuple:
    return array.dtype.str, array.shape, hashlib.blake2b(array.data, digest_size=20).digest()


def placeholder_ref(t: onnx.TensorProto) -> tuple[str, str] | None:
    """(store id, key) of a placeholder initializer, else None."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    loc = next((e.value for e in t.external_data if e.key == "location"), "")
    if not loc.startswith(STORE_LOCATION):
        return None
    store_id, _, key = loc[len(STORE_LOCATION):].partition("/")
    return store_id, key


def store_of(model) -> WeightStore | None:
    """The store a model's (or graph's) placeholders point to (None for one that holds all its weights)."""
    for t in getattr(model, "graph", model).initializer:
        ref = placeholder_ref(t)
        if ref is not None:
            return _STORES.get(ref[0])
    return None


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array that also reads placeholders (the store's array itself: read-only, never copied)."""
    ref = placeholder_ref(t)
    if ref is None:
        return numpy_helper.to_array(t)
    store = _STORES.get(ref[0])
    if store is None or ref[1] not in store.arrays:
        raise GraphPassError(f"weight {t.name!r} refers to a weight store that is gone ({ref[0]}/{ref[1]})")
    return store.arrays[ref[1]]


def externalize(model: onnx.ModelProto, store: WeightStore, min_elements: int | None = None,
                prefix: str = "") -> onnx.ModelProto:
    """A copy of `model` whose initializers of at least `min_elements` elements are placeholders for arrays in
    `store` (key: `prefix` + name). `model` is emptied of them: drop it, for protobuf frees a message's memory
    only with the whole message (its arena), so the weights leave memory with the old model, not before."""
    limit = _SKELETON_MIN_ELEMENTS if min_elements is None else min_elements
    inits = model.graph.initializer
    for i, t in enumerate(inits):
        if placeholder_ref(t) is not None or int(np.prod(t.dims, dtype=np.int64)) < limit:
            continue
        if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        key = prefix + t.name
        while key in store.arrays:  # a name reused for other values (a float16 weight widened in place)
            key += "+"
        inits[i].CopyFrom(store.put(t.name, numpy_helper.to_array(t), key))
    return clone(model)


def materialize(model: onnx.ModelProto, keep=None) -> onnx.ModelProto:
    """A copy of `model` holding every weight itself (for files and processes outside this one); `keep(key)`
    true leaves that placeholder as it is (weights the receiver has in its own store)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        ref = placeholder_ref(t)
        if ref is not None and not (keep is not None and keep(ref[1])):
            t.CopyFrom(numpy_helper.from_array(tensor_array(t), t.name))
    return out


def has_derived(model: onnx.ModelProto) -> bool:
    """Whether `model` refers to weights a rewrite derived (kept in the store under "derived/" keys)."""
    return any((ref := placeholder_ref(t)) is not None and ref[1].startswith("derived/")
               for t in model.graph.initializer)


def new_initializer(model, name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer for a weight a pass computes: a placeholder in the store of `model` when it has one and
    the weight is large, else the values themselves."""
    store = store_of(model) if array.size >= _SKELETON_MIN_ELEMENTS else None
    return numpy_helper.from_array(array, name) if store is None else store.shared(name, array)


def store_for(t: onnx.TensorProto, ref, fallback) -> WeightStore:
    store = _STORES.get(ref[0])
    if store is None or ref[1] not in store.arrays:
        store = fallback
    if store is None or ref[1] not in store.arrays:
        raise GraphPassError(f"weight {t.name!r} refers to a weight store that is gone ({ref[0]}/{ref[1]})")
    return store


def ort_model(model: onnx.ModelProto, options, fallback: WeightStore | None = None,
              optimized: bool = True) -> tuple[bytes, list]:
    """`model` serialised for an onnxruntime session made with SessionOptions `options`, its placeholders
    resolved without copying a weight on our side: weights mapped from a file become external-data references
    to that file (onnxruntime maps it as well), the others OrtValues of the store's arrays. How those are handed
    over depends on `optimized` (whether the session's graph optimisation is on): onnxruntime's optimisers read
    an initializer's data from the graph, so there they go as add_external_initializers (onnxruntime 1.32 copies
    them into the session); a session with optimisation off gets them as shared initializers (add_initializer:
    the array's memory itself, measured: no copy). Edits `model` in place (pass a graph of your own). Returns the
    bytes and the OrtValues, which must live as long as the session (their arrays stay in the store; Engine
    also keeps them with the session, for a store entry dropped before it)."""
    # onnxruntime reads external data from one folder: the one holding most of the mapped bytes (the model's,
    # beside a cache folder's weight file); weights mapped from elsewhere are shared as arrays (their maps)
    mapped: dict = {}
    for t in model.graph.initializer:
        ref = placeholder_ref(t)
        if ref is not None and (file := store_for(t, ref, fallback).files.get(ref[1])) is not None:
            mapped.setdefault(file[0].parent, [0, file[0].name])[0] += file[2]
    folder = max(mapped, key=lambda f: mapped[f][0]) if mapped else None
    shared = []
    for t in model.graph.initializer:
        ref = placeholder_ref(t)
        if ref is None:
            continue
        store = store_for(t, ref, fallback)
        file = store.files.get(ref[1])
        if file is not None and file[0].parent == folder:
            del t.external_data[:]
            for k, v in (("location", file[0].name), ("offset", str(file[1])), ("length", str(file[2]))):
                t.external_data.add(key=k, value=v)
        else:
            shared.append((t, store.ortvalue(ref[1])))
    if shared and optimized:
        options.add_external_initializers([t.name for t, _ in shared], [value for _, value in shared])
    elif shared:
        # onnxruntime checks that an initializer's external file exists before it takes the shared value
        # instead: any file of the folder serves (it is never read)
        anchor = (folder, mapped[folder][1]) if folder is not None else _anchor_file()
        folder = anchor[0]
        for t, value in shared:
            del t.external_data[:]
            t.external_data.add(key="location", value=anchor[1])
            options.add_initializer(t.name, value)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return model.SerializeToString(), [value for _, value in shared]


_ANCHOR: list = []


def _anchor_file():
    """(folder, name) of an empty file of this process's, for graphs whose weights are all shared arrays."""
    if not _ANCHOR:
        import atexit
        import shutil
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp(prefix="onnx-saliency-"))
        (folder / "shared-weights").touch()
        atexit.register(shutil.rmtree, folder, True)
        _ANCHOR.append((folder, "shared-weights"))
    return _ANCHOR[0]


def is_file_backed(t: onnx.TensorProto) -> bool:
    ref = placeholder_ref(t)
    store = _STORES.get(ref[0]) if ref is not None else None
    return store is not None and ref[1] in store.files


def placeholder_keys(model: onnx.ModelProto) -> set[str]:
    return {ref[1] for t in model.graph.initializer if (ref := placeholder_ref(t)) is not None}


def checked(model: onnx.ModelProto, pass_name: str) -> onnx.ModelProto:
    """Every pass ends here: its output must satisfy the ONNX checker before anyone runs it."""
    try:
        onnx.checker.check_model(skeleton(model))
    except Exception as err:  # checker raises several types; the pass name is what the user needs
        raise GraphPassError(f"{pass_name}: produced an invalid model: {str(err).splitlines()[0]}") from err
    return model


# Ops whose first output has the first input's type and shape, for the ones onnx infers nothing for
# (GroupNormalization-21, a function op, in onnx 1.23): without it every shape after one is lost.
_SAME_SHAPE_OPS = {"GroupNormalization", "LayerNormalization", "InstanceNormalization", "LRN", "Gelu", "Mish",
                   "Erf", "Softplus", "BatchNormalization"}


def _same_shape_hints(model: onnx.ModelProto, inferred: onnx.ModelProto) -> list:
    known = {vi.name: vi for vi in list(inferred.graph.input) + list(inferred.graph.value_info)
             + list(inferred.graph.output) if vi.type.tensor_type.HasField("shape")}
    hints = []
    for node in model.graph.node:
        if (node.op_type in _SAME_SHAPE_OPS and node.output and node.output[0] not in known
                and node.input[0] in known):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known[node.input[0]])
            vi.name = node.output[0]
            hints.append(vi)
    return hints


def _known_dims(vi: onnx.ValueInfoProto) -> int:
    tt = vi.type.tensor_type
    return -1 if not tt.HasField("shape") else sum(d.HasField("dim_value") for d in tt.shape.dim)


def _most_specific(value_info) -> list:
    """One entry per tensor: shape inference appends its own entry beside a given hint instead of merging the
    two, and readers take the first; keep the one that knows the most dims."""
    best: dict = {}
    for vi in value_info:
        if vi.name not in best or _known_dims(vi) > _known_dims(best[vi.name]):
            best[vi.name] = vi
    return list(best.values())


def infer(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """A copy of `model` with shapes inferred for every tensor (computed on the weight-free skeleton);
    inplace: annotate `model` itself (for a pass's own intermediate copy: saves a copy of the weights)."""
    sk = skeleton(model)
    inferred = shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    for _ in range(8):  # each round lets the shapes after one more such op through
        hints = _same_shape_hints(model, inferred)
        if not hints:
            break
        del sk.graph.value_info[:]
        sk.graph.value_info.extend(list(inferred.graph.value_info) + hints)
        inferred = shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    out = model if inplace else clone(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(_most_specific(inferred.graph.value_info))
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def const_value(graph: onnx.GraphProto, name: str, inits=None) -> np.ndarray | None:
    """The numpy value of an initializer (or a Constant node output), else None."""
    inits = inits if inits is not None else initializers(graph)
    if name in inits:
        return tensor_array(inits[name])
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    elem_type: int
    shape: tuple  # ints for static dims, None for symbolic/unknown ones; () for scalars; None if rank unknown

    @property
    def is_float(self) -> bool:
        return self.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                  onnx.TensorProto.BFLOAT16)


def _shape_of(vtype) -> tuple | None:
    tt = vtype.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Type and shape of every tensor in an already shape-inferred model."""
    g = model.graph
    out: dict[str, TensorInfo] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        out[vi.name] = TensorInfo(vi.name, vi.type.tensor_type.elem_type, _shape_of(vi.type))
    for t in g.initializer:
        out[t.name] = TensorInfo(t.name, t.data_type, tuple(t.dims))
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = TensorInfo(node.output[0], attr.t.data_type, tuple(attr.t.dims))
    return out


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: IR < 4 exports also list every initializer as an input."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def summarize_nodes(nodes, names_per_op: int = 3) -> str:
    """(name, op type) pairs as one short line, grouped by op type in graph order: "Slice (274: a, b, c and 271
    more); Gather (2: d, e)". Error messages list thousands of nodes on some exports; this stays readable."""
    groups: dict[str, list[str]] = {}
    for name, op in nodes:
        groups.setdefault(op, []).append(name)
    parts = []
    for op, names in groups.items():
        shown = ", ".join(names[:names_per_op])
        more = f" and {len(names) - names_per_op} more" if len(names) > names_per_op else ""
        parts.append(f"{op} ({len(names)}: {shown}{more})")
    return "; ".join(parts)


def unique_node_names(model: onnx.ModelProto) -> None:
    """Reports and rules are keyed by node name, so every node gets one (in place, on a private copy)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def ancestors(graph: onnx.GraphProto, tensors) -> set[str]:
    """Names of all tensors that the given tensors depend on (inclusive)."""
    prod = producers(graph)
    seen, stack = set(), list(tensors)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = prod.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return seen


def _outer_names(node: onnx.NodeProto) -> list[str]:
    """Tensors a node reads: its inputs and whatever its subgraphs (If/Loop/Scan bodies) read from outside."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            local = {t.name for t in sub.initializer} | {vi.name for vi in sub.input}
            for n in sub.node:
                local.update(o for o in n.output if o)
            names += [t for n in sub.node for t in _outer_names(n) if t not in local]
    return names


def is_topological(graph: onnx.GraphProto) -> bool:
    """Does every node come after the producers of everything it reads (as ONNX requires)?"""
    produced = {t.name for t in graph.initializer} | {vi.name for vi in graph.input}
    made_by_nodes = {o for n in graph.node for o in n.output if o}
    for node in graph.node:
        if any(t in made_by_nodes and t not in produced for t in _outer_names(node)):
            return False
        produced.update(o for o in node.output if o)
    return True


def execution_order(graph: onnx.GraphProto, tensors) -> list[onnx.NodeProto]:
    """The nodes the given tensors depend on, in the order an evaluator computes them from the data flow alone:
    depth first from the given tensors, each node's operands in operand order, a node after its operands.

    The node listing is not used, so no pass that re-sorts a graph can change this order. For parallel branches
    it is the order in which the framework's code wrote the operands of their merge: torchvision's
    `out += identity` exports Add(main, shortcut), Keras' `Add()([shortcut, x])` the other way round, and
    both frameworks run (and hook) the branches in that order."""
    prod = {o: n for n in graph.node for o in n.output if o}
    order: list[onnx.NodeProto] = []
    done: set[int] = set()
    for root in tensors:
        node = prod.get(root)
        if node is None or id(node) in done:
            continue
        stack = [(node, iter(_outer_names(node)))]
        on_path = {id(node)}
        while stack:
            current, operands = stack[-1]
            for t in operands:
                child = prod.get(t)
                if child is not None and id(child) not in done and id(child) not in on_path:
                    stack.append((child, iter(_outer_names(child))))
                    on_path.add(id(child))
                    break
            else:
                stack.pop()
                on_path.discard(id(current))
                done.add(id(current))
                order.append(current)
    return order
