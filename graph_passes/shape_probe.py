"""Shapes that shape inference cannot see, measured by one onnxruntime run, so constant folding can finish.

onnx-graphsurgeon folds a Shape node only where shape inference knows its input's shape. Exports whose shape
arithmetic feeds Pads, Reshapes and Slices with computed sizes (torchvision's Swin-T: the shifted-window masks)
lose every shape after the first such node, and folding stops there: 676 of Swin-T's 835 remaining nodes were
input-independent mask arithmetic. Here the tensors whose shapes Shape/Size nodes read are measured in one run
on a zero image (two runs at batch 2 and 3 when the batch is dynamic: a dim that differs is left symbolic), and
handed back as value_info, so the next folding pass folds the whole input-independent part at once.

A measured shape is only used where it cannot depend on the image's values: the tensor's shape must follow
from the input's shape alone (no NonZero-like op upstream, no size parameter computed from image values), as
a structural sweep over the graph establishes first.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ._graph import clone, graph_inputs, initializers, ort_model, tensor_infos

# Output shape depends on input *values* (beyond sizes given as inputs, handled below).
_DATA_SHAPED = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "Loop", "If", "Scan", "StringSplit",
                "TfIdfVectorizer", "SequenceConstruct", "SplitToSequence"}
# Output shape follows from the input shapes and attributes alone, whatever the inputs' values.
_SHAPE_FROM_SHAPES = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Not", "Neg", "Abs", "Relu", "LeakyRelu", "PRelu", "Clip",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Softplus",
    "Softsign", "Mish", "Elu", "Selu", "Celu", "Floor", "Ceil", "Round", "Sign", "Cast", "CastLike", "Identity",
    "Dropout", "Softmax", "LogSoftmax", "Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "BatchNormalization", "LayerNormalization",
    "InstanceNormalization", "GroupNormalization", "LRN", "Transpose", "Flatten", "Concat", "Gather",
    "GatherElements", "GatherND", "ScatterND", "ScatterElements", "DepthToSpace", "SpaceToDepth", "Shape", "Size",
    "ArgMax", "ArgMin", "CumSum", "IsNaN", "IsInf", "Trilu", "Constant",
}
_MAX_PROBED = 4096


def _dependence(model: onnx.ModelProto, inputs: set) -> tuple[set, set]:
    """(value-dependent tensors, shape-dependent tensors): whose values / shapes can change with the image's
    values (not only with its shape)."""
    value_dep, shape_dep = set(inputs), set()
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        op = node.op_type
        if op in ("Shape", "Size"):
            dep_value = any(i in shape_dep for i in ins)
        elif op.startswith("Random"):
            dep_value = True
        else:
            dep_value = any(i in value_dep for i in ins)
        if op in _DATA_SHAPED:
            dep_shape = any(i in value_dep or i in shape_dep for i in ins)
        elif op in _SHAPE_FROM_SHAPES:
            dep_shape = any(i in shape_dep for i in ins)
        else:  # size parameters (Reshape's shape, Pad's pads, Slice's starts...) are every input but the data
            dep_shape = any(i in shape_dep for i in ins) or any(i in value_dep for i in ins[1:])
        for o in node.output:
            if o:
                if dep_value:
                    value_dep.add(o)
                if dep_shape:
                    shape_dep.add(o)
    return value_dep, shape_dep


def probe_shapes(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """value_info for the tensors read by Shape/Size nodes whose shapes inference left incomplete (the model
    must carry inferred shapes), measured by running it; [] when there is nothing to measure or it cannot be
    measured safely (a dynamic dim other than the batch, a non-float input, a data-shaped op upstream)."""
    infos = tensor_infos(model)
    inputs = graph_inputs(model)
    if not inputs:
        return []
    static = []
    for vi in inputs:
        info = infos.get(vi.name)
        if info is None or info.shape is None or info.elem_type not in (onnx.TensorProto.FLOAT,
                                                                         onnx.TensorProto.FLOAT16):
            return []
        if any(d is None for d in info.shape[1:]) or not info.shape:
            return []
        static.append(info.shape[0] is not None)
    value_dep, shape_dep = _dependence(model, {vi.name for vi in inputs})
    inits = initializers(model.graph)
    wanted = []
    for node in model.graph.node:
        if node.op_type not in ("Shape", "Size") or not node.input[0] or node.input[0] in inits:
            continue
        t = node.input[0]
        info = infos.get(t)
        known = info is not None and info.shape is not None and all(d is not None for d in info.shape)
        if not known and t not in shape_dep and t not in wanted:
            wanted.append(t)
    if not wanted or len(wanted) > _MAX_PROBED:
        return []
    batches = [None] if all(static) else [2, 3]
    measured = _run(model, inputs, infos, wanted, batches)
    if measured is None:
        return []
    hints = []
    for t in wanted:
        runs = [m[t] for m in measured]
        if any(len(r) != len(runs[0]) for r in runs):
            continue
        dims = [int(d[0]) if len(set(d)) == 1 else f"{t}_probe_d{k}" for k, d in enumerate(zip(*runs))]
        elem = infos[t].elem_type if t in infos else onnx.TensorProto.FLOAT
        hints.append(helper.make_tensor_value_info(t, elem, dims))
    return hints


def _run(model, inputs, infos, wanted, batches) -> list[dict] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    probe = clone(model)
    del probe.graph.output[:]
    for i, t in enumerate(wanted):
        name = f"shape_probe/{i}"
        probe.graph.node.append(helper.make_node("Shape", [t], [name], name=f"{name}/node"))
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    opts = ort.SessionOptions()  # its log follows onnxruntime's default logger (onnx_saliency quiets that)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # one run: build it fast
    opts.add_session_config_entry("session.disable_prepacking", "1")  # and read the weights where they lie
    try:
        data, _ = ort_model(probe, opts, optimized=False)  # weights mapped or shared, not copied
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        results = []
        for batch in batches:
            feeds = {}
            for vi in inputs:
                shape = list(infos[vi.name].shape)
                shape[0] = shape[0] if batch is None else batch
                dtype = np.float16 if infos[vi.name].elem_type == onnx.TensorProto.FLOAT16 else np.float32
                feeds[vi.name] = np.zeros(shape, dtype)
            values = sess.run(None, feeds)
            results.append({t: list(v) for t, v in zip(wanted, values)})
        return results
    except Exception:  # the probe only helps folding: a model it cannot run is folded as far as inference goes
        return None
