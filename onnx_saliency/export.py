"""Export an explain graph: one ONNX file that returns the model's outputs plus a saliency map, in any
onnxruntime host (C++, C#, Java, JS, mobile; any execution provider) with no Python.

Inputs: the model's own image input (same name, layout and preprocessing as the original) and ``targets``
(int64, one per image; -1 = the top-1 class). Outputs: the original outputs, ``target_class``,
``target_score``, ``saliency_map`` (N, H, W) and, for pixel methods, ``attributions`` (the per-channel
gradient products or LRP relevance, in the input's layout). The map arithmetic itself (CAM weights, ReLU,
min-max, Resize) is ONNX nodes, so the file reproduces ``Explainer.explain`` without this package.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

import graph_passes as gp
from graph_passes._graph import ancestors, checked, materialize, opset_of

from . import __version__
from .engine import RULE_SETS
from .errors import SaliencyError
from .methods import get_method

MAP_OUTPUT = "saliency_map"
ATTRIBUTIONS_OUTPUT = "attributions"
META_PREFIX = "onnx_saliency.explain."
CAM_EXPORTABLE = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise")
PIXEL_EXPORTABLE = ("gradient", "gradient-x-input", "guided-backprop", "lrp", "excitation-backprop")
EXPORTABLE = CAM_EXPORTABLE + PIXEL_EXPORTABLE


class _Nodes:
    """Appends map nodes (prefix ``explain/``) and their constants to a graph."""

    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.opset = opset_of(model)
        self.count = 0

    def add(self, op, inputs, out=None, **attributes) -> str:
        self.count += 1
        out = out or f"explain/{op.lower()}_{self.count}"
        self.g.node.append(helper.make_node(op, inputs, [out], name=f"explain/{op}_{self.count}", **attributes))
        return out

    def const(self, value, dtype=np.float32) -> str:
        self.count += 1
        name = f"explain/const_{self.count}"
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def reduce(self, op, x, axes, keepdims=1, out=None) -> str:
        # ReduceSum takes axes as an input from opset 13, the other reductions only from opset 18
        if op == "ReduceSum" or self.opset >= 18:
            return self.add(op, [x, self.const(axes, np.int64)], out, keepdims=keepdims)
        return self.add(op, [x], out, axes=list(axes), keepdims=keepdims)

    def minmax(self, m, out=None) -> str:
        """pytorch-grad-cam's per-image scaling of (N, h, w) maps: (m - min) / (1e-7 + max(m - min))."""
        shifted = self.add("Sub", [m, self.reduce("ReduceMin", m, [1, 2])])
        peak = self.reduce("ReduceMax", shifted, [1, 2])
        return self.add("Div", [shifted, self.add("Add", [self.const(1e-7), peak])], out)

    def resize(self, m, size) -> str:
        """(N, h, w) -> (N, H, W) bilinear, half-pixel centres: cv2.resize's INTER_LINEAR for upsampling."""
        four = self.add("Unsqueeze", [m, self.const([1], np.int64)])
        batch = self.add("Slice", [self.add("Shape", [four]), self.const([0], np.int64), self.const([1], np.int64)])
        sizes = self.add("Concat", [batch, self.const([1, size[0], size[1]], np.int64)], axis=0)
        up = self.add("Resize", [four, "", "", sizes], mode="linear", coordinate_transformation_mode="half_pixel")
        return self.add("Squeeze", [up, self.const([1], np.int64)])


def _cam_map(n: _Nodes, method: str, A: str, G: str) -> str:
    """The layer map before ReLU, (N, h, w), exactly as methods/cam.py computes it in numpy."""
    def channel_sum(t):
        return n.reduce("ReduceSum", t, [1], keepdims=0)

    def weighted(weights):
        return channel_sum(n.add("Mul", [weights, A]))

    if method == "gradcam":
        return weighted(n.reduce("ReduceMean", G, [2, 3]))
    if method == "gradcam++":
        g2 = n.add("Mul", [G, G])
        g3 = n.add("Mul", [g2, G])
        sum_a = n.reduce("ReduceSum", A, [2, 3])
        denom = n.add("Add", [n.add("Add", [n.add("Mul", [n.const(2.0), g2]), n.add("Mul", [sum_a, g3])]),
                              n.const(1e-6)])
        aij = n.add("Where", [n.add("Equal", [G, n.const(0.0)]), n.const(0.0), n.add("Div", [g2, denom])])
        return weighted(n.reduce("ReduceSum", n.add("Mul", [n.add("Relu", [G]), aij]), [2, 3]))
    if method == "xgradcam":
        sum_a = n.add("Add", [n.reduce("ReduceSum", A, [2, 3]), n.const(1e-7)])
        return weighted(n.reduce("ReduceSum", n.add("Div", [n.add("Mul", [G, A]), sum_a]), [2, 3]))
    if method == "layercam":
        return channel_sum(n.add("Mul", [n.add("Relu", [G]), A]))
    if method == "hirescam":
        return channel_sum(n.add("Mul", [G, A]))
    if method == "gradcam-elementwise":
        return channel_sum(n.add("Relu", [n.add("Mul", [G, A])]))
    raise AssertionError(method)


def build_explain_graph(explainer, method: str, layers=("auto",), *, resize: bool = True,
                        composite: str | None = None, rule_map=None, init: str | None = None) -> onnx.ModelProto:
    """The explain graph for `method` on the explainer's model (see the module docstring)."""
    m_obj = get_method(method)
    name = m_obj.name
    if name not in EXPORTABLE:
        raise SaliencyError(f"--method {method}: cannot be exported as one graph (needs several passes or an SVD); "
                            f"exportable: {', '.join(EXPORTABLE)}")
    model = explainer.model
    score, size = model.score_tensor, (model.input_hw[0], model.input_hw[1])
    if (size[0] is None or size[1] is None) and (resize or name not in CAM_EXPORTABLE):
        raise SaliencyError(f"{model.path.name}: the input size is dynamic; the explain graph needs a static H x W")
    info = {"method": name, "package_version": __version__, "source_sha256": model.sha256,
            "input_layout": model.layout}
    if name in CAM_EXPORTABLE:
        specs = list(layers) or ["auto"]
        tensors = [explainer.resolve_layer(s) for s in specs]
        if not resize and len(tensors) > 1:
            raise SaliencyError("--no-resize: several layers only combine at the input resolution")
        g = gp.append_target_seed(gp.expose_tensors(model.canonical, [score]), score)
        g = gp.append_vjp(g, score, tensors, seed=gp.SEED, rules=RULE_SETS["plain"])
        n = _Nodes(g)
        per_layer = []
        for t in tensors:
            cam = n.add("Relu", [_cam_map(n, name, t, gp.grad_name(t))])
            per_layer.append(n.resize(n.minmax(cam), size) if resize else cam)
        if resize:
            mean = per_layer[0] if len(per_layer) == 1 else n.add(
                "Div", [n.add("Sum", per_layer), n.const(float(len(per_layer)))])
            n.minmax(mean, out=MAP_OUTPUT)
        else:
            n.add("Identity", [per_layer[0]], MAP_OUTPUT)
        info["layers"] = ",".join(tensors)
        info["map"] = "relu, min-max, resized to the input, min-max" if resize else "relu at layer resolution"
        extra = []
    else:
        g, relevance = _pixel_graph(explainer, name, composite, rule_map, init, info)
        n = _Nodes(g)
        x = model.input_name
        if name == "gradient-x-input":
            relevance = n.add("Mul", [relevance, x])
        if name in ("gradient", "guided-backprop"):
            n.reduce("ReduceMax", n.add("Abs", [relevance]), [1], keepdims=0, out=MAP_OUTPUT)
        elif name == "excitation-backprop":
            n.add("Relu", [n.reduce("ReduceSum", relevance, [1], keepdims=0)], MAP_OUTPUT)
        else:
            n.reduce("ReduceSum", relevance, [1], keepdims=0, out=MAP_OUTPUT)
        attributions = relevance if model.layout == "NCHW" else n.add("Transpose", [relevance], perm=[0, 2, 3, 1])
        n.add("Identity", [attributions], ATTRIBUTIONS_OUTPUT)
        extra = [ATTRIBUTIONS_OUTPUT]
    outputs = [o.name for o in model.canonical.graph.output] + [gp.RESOLVED, gp.TARGET_SCORE, MAP_OUTPUT] + extra
    info["outputs"] = ",".join(outputs)
    return _finish(g, explainer, outputs, info, size if resize or name not in CAM_EXPORTABLE else None)


def _pixel_graph(explainer, name, composite, rule_map, init, info):
    model = explainer.model
    x, score = model.input_name, model.score_tensor
    if name in ("lrp", "excitation-backprop"):
        from . import lrp as L

        default = "excitation-backprop" if name == "excitation-backprop" else L.DEFAULT_COMPOSITE
        comp = L.resolve_composite(explainer.engine, composite or default, rule_map)
        init = init or ("one" if name == "excitation-backprop" else "logit")
        g = L.build_relevance_graph(model.canonical, score, model.num_classes, [x], comp, init)
        info.update(composite=comp.name, init=init)
        return g, gp.grad_name(x)
    rules = "guided" if name == "guided-backprop" else "plain"
    g = gp.append_target_seed(gp.expose_tensors(model.canonical, [score]), score)
    g = gp.append_vjp(g, score, [x], seed=gp.SEED, rules=RULE_SETS[rules])
    return g, gp.grad_name(x)


def _finish(g: onnx.ModelProto, explainer, outputs, info, size) -> onnx.ModelProto:
    model = explainer.model
    declared = {o.name: o for o in g.graph.output}
    del g.graph.output[:]
    for name in outputs:
        if name in declared:
            g.graph.output.append(declared[name])
        elif name == MAP_OUTPUT:
            dims = ["N", *(size or ["h", "w"])]
            g.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
        elif name == ATTRIBUTIONS_OUTPUT:
            # shaped like the user's input (its layout restored below); inference cannot always see that
            # through the backward ops (MaxUnpool's shape is a run-time input)
            g.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, _input_dims(model)))
        else:
            g.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    _prune(g)
    if model.layout == "NHWC":
        _restore_nhwc_input(g, model.input_name)
    props = {p.key: p.value for p in model.original.metadata_props}
    pre = explainer.preprocessing
    props.update({"onnx_saliency.preset": pre.preset, "onnx_saliency.resize": str(pre.resize).lower(),
                  "onnx_saliency.crop": str(pre.crop).lower(), "onnx_saliency.resize_mode": pre.resize_mode})
    if model.labels and "onnx_saliency.labels" not in props:
        props["onnx_saliency.labels"] = json.dumps([str(label) for label in model.labels])
    props.update({META_PREFIX + k: str(v) for k, v in info.items()})
    del g.metadata_props[:]
    for key, value in props.items():
        g.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    del g.graph.value_info[:]
    g = materialize(g)  # the file holds its weights (in memory they live once, in the model's weight store)
    g = onnx.shape_inference.infer_shapes(g, strict_mode=False)
    return checked(g, "export-explainer")


def _input_dims(model) -> list:
    """The original image input's dims (values or parameter names), symbolic where unknown."""
    vi = next((v for v in model.original.graph.input if v.name == model.input_name), None)
    dims = [] if vi is None else list(vi.type.tensor_type.shape.dim)
    if len(dims) != 4:
        return ["N", "d1", "d2", "d3"]
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"d{i}") for i, d in enumerate(dims)]


def _prune(g: onnx.ModelProto) -> None:
    """Drop nodes and initializers no kept output depends on (exposed activations, raw gradients)."""
    needed = ancestors(g.graph, [o.name for o in g.graph.output])
    keep = [n for n in g.graph.node if any(o in needed for o in n.output)]
    del g.graph.node[:]
    g.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inits = [t for t in g.graph.initializer if t.name in used]
    del g.graph.initializer[:]
    g.graph.initializer.extend(inits)


def _restore_nhwc_input(g: onnx.ModelProto, name: str) -> None:
    """Canonicalisation absorbed the NHWC input's Transpose; the exported file takes the original layout again."""
    inner = f"{name}/nchw"
    for node in g.graph.node:
        for i, t in enumerate(node.input):
            if t == name:
                node.input[i] = inner
    vi = next(v for v in g.graph.input if v.name == name)
    dims = list(vi.type.tensor_type.shape.dim)
    new = [dims[0], dims[2], dims[3], dims[1]]
    del vi.type.tensor_type.shape.dim[:]
    vi.type.tensor_type.shape.dim.extend(new)
    g.graph.node.insert(0, helper.make_node("Transpose", [name], [inner], perm=[0, 3, 1, 2], name="explain/to_nchw"))


def explain_graph_info(model: onnx.ModelProto) -> dict | None:
    """The explain.* metadata of an exported explain graph, or None for an ordinary model."""
    info = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    return info if "method" in info else None


def export_explainer(explainer, out_path, method: str, layers=("auto",), **kw) -> onnx.ModelProto:
    from .output.writers import write_bytes

    graph = build_explain_graph(explainer, method, layers, **kw)
    data = graph.SerializeToString()
    if len(data) >= 2 ** 31 - 1:
        raise SaliencyError(f"{out_path}: the explain graph exceeds protobuf's 2 GB limit")
    write_bytes(out_path, data)
    return graph
