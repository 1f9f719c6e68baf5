"""canonicalize: bring any exported classifier to the small op set the backward and relevance rules know.

Steps, each recorded in the returned report so users can see what changed in their model:
0. compute float16 / bfloat16 (and mixed-precision) models in float32 (precision.py);
1. upgrade to opset >= 17 (the backward rules need ScatterElements with reduction, Split with inputs);
2. fold constants (Constant nodes, Identity-on-initializer chains, shape arithmetic on static shapes, and the
   shape arithmetic behind data-dependent Pads/Reshapes once shape_probe has measured what inference missed);
3. drop Identity/Dropout;
4. fold inference-mode BatchNormalization into the preceding Conv/Gemm when that is exact
   (the producer has no other consumer and constant weights);
5. absorb an NHWC input's Transpose(perm=[0,3,1,2]) so the graph takes NCHW and every map is NCHW;
6. rewrite Reshape-to-(N, -1) of a known shape as Flatten(axis=1);
7. only with fuse_affine=True (audits): fold bias Adds, MatMul+Add heads and per-channel Mul/Add (a
   decomposed BatchNorm) into their Conv/Gemm (see fuse_affine.py), so that two exports of one network
   canonicalise to the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper, version_converter

from ._graph import (MIN_IR, MIN_OPSET, GraphPassError, attrs, checked, clone, consumers, graph_inputs, infer,
                     initializers, is_topological, new_initializer, opset_of, placeholder_ref, producers,
                     tensor_array, tensor_infos, unique_node_names)
from .fuse_affine import fuse_affine as fuse_affine_pass
from .precision import to_float32
from .shape_probe import probe_shapes

META_ORIGINAL_LAYOUT = "onnx_saliency.original_input_layout"


@dataclass
class CanonicalizeReport:
    opset_from: int = 0
    opset_to: int = 0
    removed: list[str] = field(default_factory=list)        # "Identity foo" lines
    folded_bn: list[tuple[str, str]] = field(default_factory=list)  # (bn node, into node)
    kept_bn: list[str] = field(default_factory=list)          # BN that could not be folded (e.g. after Concat)
    absorbed_transpose: str | None = None
    flattened: list[str] = field(default_factory=list)
    fused_affine: list[str] = field(default_factory=list)     # one line per node fuse_affine folded or kept
    notes: list[str] = field(default_factory=list)            # other steps worth a line (shape probe, float16)
    nodes_before: int = 0
    nodes_after: int = 0

    def lines(self) -> list[str]:
        out = [f"nodes: {self.nodes_before} -> {self.nodes_after}"]
        if self.opset_from != self.opset_to:
            out.append(f"opset upgraded {self.opset_from} -> {self.opset_to}")
        out += [f"removed {r}" for r in self.removed]
        out += [f"folded BatchNormalization {bn} into {into}" for bn, into in self.folded_bn]
        out += [f"kept BatchNormalization {bn} (no foldable producer)" for bn in self.kept_bn]
        if self.absorbed_transpose:
            out.append(f"absorbed NHWC input transpose {self.absorbed_transpose}: the graph now takes NCHW")
        out += [f"Reshape {r} -> Flatten(axis=1)" for r in self.flattened]
        out += self.fused_affine
        out += self.notes
        return out


def canonicalize(model: onnx.ModelProto, *, fold_bn: bool = True, absorb_input_transpose: bool = True,
                 fuse_affine: bool = False, return_report: bool = False):
    """Return a canonical copy of `model` (the input is never modified).

    fuse_affine is off by default so that methods see the layers the user exported; audits turn it on."""
    report = CanonicalizeReport(nodes_before=len(model.graph.node), opset_from=opset_of(model))
    m = clone(model)
    report.notes += to_float32(m)
    m = _upgrade_opset(m)
    report.opset_to = opset_of(m)
    m = _fold_input_independent(m, report)
    _drop_passthrough(m, report)
    if fold_bn:
        _fold_batchnorm(m, report)
    else:
        report.kept_bn = [n.name for n in m.graph.node if n.op_type == "BatchNormalization"]
    if absorb_input_transpose:
        _absorb_input_transpose(m, report)
    m = infer(_strip_value_info(m), inplace=True)
    _normalise_flatten(m, report)
    unique_node_names(m)  # the fusion log names nodes
    if fuse_affine:
        m = fuse_affine_pass(infer(_strip_value_info(m), inplace=True), report.fused_affine)
    m = infer(_strip_value_info(m), inplace=True)
    report.nodes_after = len(m.graph.node)
    m = checked(m, "canonicalize")
    return (m, report) if return_report else m


def _strip_value_info(m: onnx.ModelProto) -> onnx.ModelProto:
    # stale shapes after rewiring would mislead shape inference; recompute them all
    del m.graph.value_info[:]
    return m


def _upgrade_opset(m: onnx.ModelProto) -> onnx.ModelProto:
    if opset_of(m) < MIN_OPSET:
        try:
            m = version_converter.convert_version(m, MIN_OPSET)
        except Exception as err:
            raise GraphPassError(f"canonicalize: cannot upgrade opset {opset_of(m)} to {MIN_OPSET}: "
                                 f"{str(err).splitlines()[0]}") from err
    if m.ir_version < MIN_IR:
        m.ir_version = MIN_IR
    # IR >= 4 no longer needs initializers listed as inputs; listing them makes them overridable at run time,
    # which would stop onnxruntime from constant-folding the backward graph.
    inits = {t.name for t in m.graph.initializer}
    keep = [vi for vi in m.graph.input if vi.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m


# onnx-graphsurgeon 0.6 does not fold a constant whose tensor name is also a node's name (Cast "fc" feeding the
# Gemm named "fc", as in fp16-weight copies): such nodes carry this suffix while folding
_NODE_SUFFIX = "::node"


def _foldable_weights(m: onnx.ModelProto) -> set[str]:
    """Placeholder weights read by a node whose inputs are all constant (what graph-surgeon may fold: its
    onnxruntime run needs their values); every other weight stays in the store through folding."""
    constant = {t.name for t in m.graph.initializer}
    held = {t.name for t in m.graph.initializer if placeholder_ref(t) is not None}
    wanted: set[str] = set()
    for node in m.graph.node:  # exports list nodes in topological order; a missed fold is only a missed fold
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in constant for i in ins)):
            constant.update(o for o in node.output if o)
            wanted.update(i for i in ins if i in held)
    return wanted


def _fold_constants(m: onnx.ModelProto, report: CanonicalizeReport) -> onnx.ModelProto:
    tensors = {t.name for t in m.graph.initializer} | {t for n in m.graph.node for t in [*n.input, *n.output]}
    proto = clone(m)
    foldable = _foldable_weights(proto)
    for t in proto.graph.initializer:
        if t.name in foldable:
            t.CopyFrom(numpy_helper.from_array(tensor_array(t), t.name))
    for node in proto.graph.node:
        if node.name in tensors:
            node.name += _NODE_SUFFIX
    graph = gs.import_onnx(infer(proto, inplace=True))
    before = {n.name or id(n): n.op for n in graph.nodes}
    try:
        graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False)
    except Exception as err:  # folding is an optimisation: a failure must not block the explanation
        report.removed.append(f"(constant folding skipped: {str(err).splitlines()[0]})")
        return m
    after = {n.name or id(n) for n in graph.nodes}
    report.removed += [f"{op} {str(name).removesuffix(_NODE_SUFFIX)} (constant)" for name, op in before.items()
                       if name not in after]
    out = gs.export_onnx(graph, do_type_check=False)
    if not is_topological(out.graph):
        # only a listing that is not topological is re-sorted: a fresh sort would reorder parallel branches
        # (a ResNet shortcut conv ahead of its block's convs) against the order the exporter ran them in
        out = gs.export_onnx(gs.import_onnx(out).toposort(), do_type_check=False)
    for node in out.graph.node:
        node.name = node.name.removesuffix(_NODE_SUFFIX)
    out.ir_version = max(m.ir_version, MIN_IR)
    del out.opset_import[:]
    out.opset_import.extend(m.opset_import)
    out.metadata_props.extend(m.metadata_props)
    return out


def _fold_input_independent(m: onnx.ModelProto, report: CanonicalizeReport) -> onnx.ModelProto:
    """Fold constants; where Shape nodes remain on tensors shape inference could not size, measure those shapes
    (shape_probe) and fold again: everything that does not depend on the image's values goes."""
    m = _fold_constants(m, report)
    if not any(n.op_type in ("Shape", "Size") for n in m.graph.node):
        return m
    hints = probe_shapes(infer(m))
    if not hints:
        return m
    m.graph.value_info.extend(hints)
    before = len(m.graph.node)
    m = _fold_constants(m, report)
    report.notes.append(f"measured {len(hints)} shape(s) shape inference could not determine (one onnxruntime "
                        f"run on a zero image): {before - len(m.graph.node)} more input-independent node(s) folded")
    return m


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new


def _drop_passthrough(m: onnx.ModelProto, report: CanonicalizeReport) -> None:
    g = m.graph
    outputs = {o.name for o in g.output}
    for node in list(g.node):
        if node.op_type not in ("Identity", "Dropout"):
            continue
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            continue  # its mask is consumed: leave it
        src, dst = node.input[0], node.output[0]
        if dst in outputs:
            continue  # renaming a graph output would change the model's interface
        _rewire(g, dst, src)
        g.node.remove(node)
        report.removed.append(f"{node.op_type} {node.name}")


def _fold_batchnorm(m: onnx.ModelProto, report: CanonicalizeReport) -> None:
    g = m.graph
    inits = initializers(g)
    prod, cons = producers(g), consumers(g)
    outputs = {o.name for o in g.output}
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        a = attrs(bn)
        params = [inits.get(x) for x in bn.input[1:5]]
        src = prod.get(bn.input[0])
        foldable = (src is not None and src.op_type in ("Conv", "Gemm") and all(p is not None for p in params)
                    and len(cons.get(bn.input[0], [])) == 1 and bn.input[0] not in outputs
                    and a.get("training_mode", 0) == 0 and len([o for o in bn.output if o]) == 1)
        if foldable and src.op_type == "Gemm":
            ga = attrs(src)
            foldable = ga.get("transA", 0) == 0 and ga.get("alpha", 1.0) == 1.0 and ga.get("beta", 1.0) == 1.0
        if not foldable or src.input[1] not in inits or (len(src.input) > 2 and src.input[2]
                                                          and src.input[2] not in inits):
            report.kept_bn.append(bn.name)
            continue
        gamma, beta, mean, var = (tensor_array(p).astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + a.get("epsilon", 1e-5))
        w_t = inits[src.input[1]]
        w = tensor_array(w_t).astype(np.float64)
        has_bias = len(src.input) > 2 and src.input[2]
        b = tensor_array(inits[src.input[2]]).astype(np.float64) if has_bias else np.zeros(len(scale))
        if src.op_type == "Conv":
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        elif attrs(src).get("transB", 0):
            w = w * scale[:, None]
        else:
            w = w * scale[None, :]
        b = np.broadcast_to(b, scale.shape)
        b = (b - mean) * scale + beta
        # fresh initializer names: the originals may be shared with other nodes
        w_name, b_name = f"{src.name or src.output[0]}/W_bnfolded", f"{src.name or src.output[0]}/B_bnfolded"
        g.initializer.append(new_initializer(g, w_name, w.astype(tensor_array(w_t).dtype)))
        g.initializer.append(numpy_helper.from_array(b.astype(np.float32), b_name))
        src.input[1] = w_name
        if has_bias:
            src.input[2] = b_name
        else:
            src.input.append(b_name)
        _rewire(g, bn.output[0], src.output[0])
        # the BN output may be a graph output: then the producer takes over its name
        if bn.output[0] in outputs:
            old = src.output[0]
            src.output[0] = bn.output[0]
            _rewire(g, old, bn.output[0])
        g.node.remove(bn)
        report.folded_bn.append((bn.name, src.name))
    _drop_unused_initializers(g)


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    # delete in place: rebuilding the list would copy every weight (seconds on VGG-16)
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in used:
            del g.initializer[i]


# per-channel preprocessing that Keras models carry inside (Rescaling, Normalization) sits before the
# layout Transpose; it commutes with the Transpose once its constants are permuted to NCHW
_PREPROCESSING_OPS = ("Mul", "Add", "Sub", "Div")


def _nchw_constant(value: np.ndarray) -> np.ndarray | None:
    """An NHWC-broadcasting constant as the NCHW one, or None when it does not broadcast over (N, H, W, C)."""
    if value.ndim > 4:
        return None
    v = value.reshape((1,) * (4 - value.ndim) + value.shape)
    if v.shape[0] != 1 or v.shape[1] != 1 or v.shape[2] != 1:
        return None  # varies over the batch or space: not preprocessing we can move
    return np.ascontiguousarray(v.transpose(0, 3, 1, 2))


def _preprocessing_chain(g: onnx.GraphProto, start: str, cons, inits) -> tuple[list, onnx.NodeProto] | None:
    """The pointwise constant ops from the input to its Transpose(perm=[0,3,1,2]), and that Transpose."""
    chain, tensor = [], start
    while True:
        users = cons.get(tensor, [])
        if len(users) != 1 or tensor in {o.name for o in g.output}:
            return None
        node = users[0]
        if node.op_type == "Transpose":
            return (chain, node) if list(attrs(node).get("perm", [])) == [0, 3, 1, 2] else None
        if node.op_type not in _PREPROCESSING_OPS or len(node.input) != 2:
            return None
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        if other == tensor or other not in inits or _nchw_constant(inits[other]) is None:
            return None
        chain.append(node)
        tensor = node.output[0]


def _absorb_input_transpose(m: onnx.ModelProto, report: CanonicalizeReport) -> None:
    g = m.graph
    cons = consumers(g)
    inits = {i.name: tensor_array(i) for i in g.initializer
             if len(i.dims) <= 4 and int(np.prod(i.dims)) <= 4096}
    for vi in graph_inputs(m):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != 4:
            continue
        found = _preprocessing_chain(g, vi.name, cons, inits)
        if found is None:
            continue
        chain, tr = found
        for node in chain:  # the constants become NCHW; new names, as another node may share the NHWC one
            tensor_in = vi.name if node is chain[0] else chain[chain.index(node) - 1].output[0]
            k = 1 if node.input[0] == tensor_in else 0
            name = f"{node.input[k]}__nchw"
            if name not in {i.name for i in g.initializer}:
                g.initializer.append(numpy_helper.from_array(_nchw_constant(inits[node.input[k]]), name))
            node.input[k] = name
        moved = {n.output[0] for n in chain}
        keep = [v for v in g.value_info if v.name not in moved]  # their NHWC shapes no longer hold
        del g.value_info[:]
        g.value_info.extend(keep)
        n, h, w, c = list(dims)
        new_dims = [onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension(),
                    onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()]
        for new, old in zip(new_dims, (n, c, h, w)):
            new.CopyFrom(old)
        del vi.type.tensor_type.shape.dim[:]
        vi.type.tensor_type.shape.dim.extend(new_dims)
        _rewire(g, tr.output[0], chain[-1].output[0] if chain else vi.name)
        g.node.remove(tr)
        report.absorbed_transpose = tr.name
        if chain:
            names = ", ".join(n.name or n.op_type for n in chain)
            report.notes.append(f"moved the input preprocessing before {tr.name} ({names}) to NCHW")
        m.metadata_props.append(onnx.StringStringEntryProto(key=META_ORIGINAL_LAYOUT, value="NHWC"))
    _drop_unused_initializers(g)


def _normalise_flatten(m: onnx.ModelProto, report: CanonicalizeReport) -> None:
    infos = tensor_infos(m)
    for node in m.graph.node:
        if node.op_type != "Reshape":
            continue
        src, dst = infos.get(node.input[0]), infos.get(node.output[0])
        if not src or not dst or src.shape is None or dst.shape is None:
            continue
        if (len(src.shape) >= 3 and len(dst.shape) == 2 and all(d is not None for d in src.shape[1:])
                and dst.shape[1] == int(np.prod(src.shape[1:]))):
            node.op_type = "Flatten"
            del node.input[1:]
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("axis", 1))
            report.flattened.append(node.name)
    _drop_unused_initializers(m.graph)
