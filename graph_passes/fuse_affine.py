"""fuse_affine: fold per-channel constant affine ops into the Conv/Gemm that produces their input.

Exporters spell the same layer in different ways: a Conv with a bias or a Conv followed by Add(bias); a Gemm or
a MatMul + Add head; a BatchNormalization or its decomposition into Mul/Add (Sub/Mul/Add). Audits match two
graphs layer by layer, so these spellings must collapse to one: after these passes each is a single Conv or
Gemm carrying the folded weights. Every pass returns a new checked model and never edits its input; each
appends one line per rewritten node to `log` when given. A constant Mul/Add whose producer is not a foldable
layer (after a ReLU, on the input...) stays and is logged as kept.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._graph import (attrs, checked, clone, consumers, infer, initializers, new_initializer, producers,
                     tensor_array, tensor_infos)

# op -> how the constant operand combines with the layer output y
_AFFINE_OPS = ("Add", "Sub", "Mul", "Div")


def merge_bias_add(model: onnx.ModelProto, log: list | None = None) -> onnx.ModelProto:
    """Conv/Gemm -> Add(per-channel constant) becomes one Conv/Gemm with that bias."""
    return _fold_affine(model, ("Add",), log, "merge_bias_add")


def fold_scale_shift(model: onnx.ModelProto, log: list | None = None) -> onnx.ModelProto:
    """Conv/Gemm -> Mul/Div/Add/Sub(per-channel constant) chains (a decomposed BatchNorm) become one layer."""
    return _fold_affine(model, _AFFINE_OPS, log, "fold_scale_shift")


def matmul_add_to_gemm(model: onnx.ModelProto, log: list | None = None) -> onnx.ModelProto:
    """MatMul(2-D activation, 2-D constant weight) [+ Add(constant bias)] becomes Gemm (transB=0)."""
    m = _private_copy(model)
    g = m.graph
    inits = initializers(g)
    infos = tensor_infos(m)
    cons = consumers(g)
    outputs = {o.name for o in g.output}
    changed = False
    for node in [n for n in g.node if n.op_type == "MatMul"]:
        x, w = node.input[0], node.input[1]
        x_info = infos.get(x)
        if w not in inits or tensor_array(inits[w]).ndim != 2 or x_info is None or \
                x_info.shape is None or len(x_info.shape) != 2:
            continue
        units = tensor_array(inits[w]).shape[1]
        inputs, out, what = [x, w], node.output[0], f"MatMul {node.name} -> Gemm"
        users = cons.get(out, [])
        if len(users) == 1 and out not in outputs and users[0].op_type == "Add":
            add = users[0]
            bias = _channel_constant(add, out, inits, units, rank=2)
            if bias is not None:
                name = _fresh(g, f"{node.name}/bias")
                g.initializer.append(numpy_helper.from_array(bias.astype(_dtype(inits[w])), name))
                inputs.append(name)
                out = add.output[0]
                what = f"MatMul {node.name} + Add {add.name} -> Gemm {node.name}"
                g.node.remove(add)
        gemm = helper.make_node("Gemm", inputs, [out], name=node.name)
        index = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(index, gemm)
        _note(log, what)
        changed = True
    return _finish(m, "matmul_add_to_gemm", changed)


def fuse_affine(model: onnx.ModelProto, log: list | None = None) -> onnx.ModelProto:
    """All of the above: MatMul heads to Gemm, then every per-channel scale/shift folded into its layer."""
    return fold_scale_shift(matmul_add_to_gemm(model, log), log)


# --- the folding ------------------------------------------------------------------------------------------

def _fold_affine(model, ops, log, pass_name):
    m = _private_copy(model)
    g = m.graph
    kept: dict[str, str] = {}
    changed = False
    while True:
        inits, prod, cons = initializers(g), producers(g), consumers(g)
        infos = tensor_infos(m)
        outputs = {o.name for o in g.output}
        step = None
        for node in g.node:
            if node.op_type not in ops or len(node.input) != 2:
                continue
            const_at = _const_operand(node, inits)
            if const_at is None:
                continue
            x = node.input[1 - const_at]
            layer = prod.get(x)
            why = _why_not_foldable(layer, x, inits, cons, outputs)
            if why is None:
                channels, rank = _channels(layer, inits), _rank(infos, x, layer)
                value = _channel_constant(node, x, inits, channels, rank)
                if value is None:
                    why = "constant is not per-channel"
                elif node.op_type in ("Sub", "Div") and const_at == 0:
                    why = f"constant is the {'minuend' if node.op_type == 'Sub' else 'dividend'}"
                else:
                    step = (node, layer, value)
                    break
            kept[node.name] = f"kept {node.op_type} {node.name} (per-channel constant): {why}"
        if step is None:
            break
        node, layer, value = step
        _fold_into(g, node, layer, value, inits)
        _drop_unused_initializers(g)
        changed = True
        kept.pop(node.name, None)
        _note(log, f"folded {node.op_type} {node.name} into {layer.op_type} {layer.name}")
    for line in kept.values():
        _note(log, line)
    return _finish(m, pass_name, changed)


def _why_not_foldable(layer, x, inits, cons, outputs) -> str | None:
    if layer is None:
        return "its input is a graph input"
    if layer.op_type not in ("Conv", "Gemm"):
        return f"producer {layer.op_type} {layer.name} is not a Conv/Gemm"
    if layer.input[1] not in inits or (len(layer.input) > 2 and layer.input[2] and layer.input[2] not in inits):
        return f"{layer.op_type} {layer.name} has non-constant weights"
    bias = inits[layer.input[2]] if len(layer.input) > 2 and layer.input[2] else None
    if bias is not None and np.prod(bias.dims) not in (1, _channels(layer, inits)):
        return f"{layer.op_type} {layer.name} has a bias that is not per-channel"
    if len(cons.get(x, [])) != 1 or x in outputs:
        return f"the output of {layer.op_type} {layer.name} has other consumers"
    if layer.op_type == "Gemm":
        a = attrs(layer)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return f"Gemm {layer.name} uses transA/alpha/beta"
    return None


def _fold_into(g, node, layer, value, inits) -> None:
    """Rewrite `layer`'s weight and bias so that it computes node(layer(x)); then drop `node`."""
    w_t = inits[layer.input[1]]
    w = tensor_array(w_t).astype(np.float64)
    has_bias = len(layer.input) > 2 and bool(layer.input[2])
    channels = len(value)
    b = tensor_array(inits[layer.input[2]]).astype(np.float64).reshape(-1) if has_bias else np.zeros(channels)
    b = np.broadcast_to(b, (channels,)).copy()
    op = node.op_type
    if op in ("Mul", "Div"):
        scale = value if op == "Mul" else 1.0 / value
        if layer.op_type == "Conv":
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        elif attrs(layer).get("transB", 0):
            w = w * scale[:, None]
        else:
            w = w * scale[None, :]
        b = b * scale
    else:
        b = b + value if op == "Add" else b - value
    base = layer.name or layer.output[0]
    w_name, b_name = _fresh(g, f"{base}/W_affine"), _fresh(g, f"{base}/B_affine")
    # fresh names: the original initializers may be shared with other layers
    g.initializer.append(new_initializer(g, w_name, w.astype(_dtype(w_t))))
    g.initializer.append(numpy_helper.from_array(b.astype(_dtype(w_t)), b_name))
    layer.input[1] = w_name
    if has_bias:
        layer.input[2] = b_name
    else:
        layer.input.append(b_name)
    # the layer takes over the folded node's output name, so graph outputs and consumers stay wired
    layer.output[0] = node.output[0]
    g.node.remove(node)


# --- constants ---------------------------------------------------------------------------------------------

def _const_operand(node, inits) -> int | None:
    flags = [i in inits for i in node.input]
    if flags == [True, False]:
        return 0
    if flags == [False, True]:
        return 1
    return None


def _channel_constant(node, x, inits, channels, rank) -> np.ndarray | None:
    """The constant operand of `node` as a (channels,) float64 vector when it only varies along axis 1 of
    the rank-`rank` tensor `x` (so folding is exact); else None."""
    other = node.input[1] if node.input[0] == x else node.input[0]
    if other not in inits or channels is None or rank is None:
        return None
    v = tensor_array(inits[other])
    if v.dtype.kind != "f" or v.ndim > rank:
        return None
    shape = (1,) * (rank - v.ndim) + v.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1).astype(np.float64), (channels,)).copy()


def _channels(layer, inits) -> int | None:
    w = inits[layer.input[1]].dims
    if layer.op_type == "Conv":
        return w[0]
    return w[0] if attrs(layer).get("transB", 0) else w[1]


def _rank(infos, x, layer) -> int | None:
    info = infos.get(x)
    if info is not None and info.shape is not None:
        return len(info.shape)
    return 2 if layer.op_type == "Gemm" else None


def _dtype(tensor: onnx.TensorProto):
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


def _fresh(g, hint: str) -> str:
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    name, k = hint, 1
    while name in taken:
        k += 1
        name = f"{hint}_{k}"
    return name


# --- plumbing ----------------------------------------------------------------------------------------------

def _private_copy(model):
    m = clone(model)
    return m if m.graph.value_info else infer(m)


def _drop_unused_initializers(g) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _finish(m, pass_name, changed: bool):
    if not changed:
        return checked(m, pass_name)
    _drop_unused_initializers(m.graph)
    del m.graph.value_info[:]  # shapes of renamed tensors are recomputed, never carried over stale
    return checked(infer(m), pass_name)


def _note(log, line: str) -> None:
    if log is not None:
        log.append(line)


__all__ = ["merge_bias_add", "fold_scale_shift", "matmul_add_to_gemm", "fuse_affine"]
