"""Audit two exports of one classifier: do they compute the same thing, do they explain alike, where do they part?

Both models are canonicalised with fuse_affine=True (BN folded, layout transposes absorbed, bias Adds, MatMul
heads and decomposed BatchNorms folded into their Conv/Gemm), so that two spellings of one layer become one
node. The compute nodes of both graphs (shape-only ops left out) are aligned by op sequence (longest common
subsequence of op signatures); aligned Conv/Gemm layers compare their weights up to layout (Gemm weights as
(out, in)); A nodes left unaligned are matched to the B tensor of the same shape with the most similar
activations. On the images, every pair compares activations and, for spatial tensors, the Grad-CAM map at
that tensor; the first pair where weights, activations or Grad-CAM part is named.

Explanations: both models explain A's top-1 classes with each method (CAM methods at A's layer and its match
in B); the maps are compared per image by Pearson r, SSIM and the IoU of their top-10 % pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graph_passes import grad_name
from graph_passes._graph import ancestors, attrs, initializers, tensor_array, tensor_infos

from ..errors import SaliencyError
from ..explainer import Explainer
from ..methods import get_method
from ..methods.base import Request
from ..output.postprocess import resize_maps, scale_cam_image

SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Dropout"}
LINEAR = ("Conv", "Gemm", "MatMul")
TOP_FRACTION = 0.10
# activations and gradients of every aligned tensor are held in memory: the per-layer analysis uses at most
# this many images (the prediction and explanation checks use all of them)
LAYER_IMAGES = 4


@dataclass
class Tolerances:
    """Limits for `agree`. logits: max |delta logit| relative to max(1, max |logit|); top1: fraction of images
    whose top-1 must agree; pearson/ssim/iou: minimum per image and method (0 = report only); weights /
    activations: max |delta| relative to max |A| per aligned layer; layer_cam: minimum per-layer Grad-CAM r."""

    logits: float = 1e-3
    top1: float = 1.0
    pearson: float = 0.99
    ssim: float = 0.0
    iou: float = 0.0
    weights: float = 1e-3
    activations: float = 1e-3
    layer_cam: float = 0.99

    @classmethod
    def parse(cls, pairs) -> "Tolerances":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for pair in pairs:
            key, sep, value = str(pair).partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in known:
                raise SaliencyError(f"--tolerance {pair!r}: expected KEY=VALUE with KEY one of "
                                    f"{', '.join(sorted(known))}")
            try:
                values[key] = float(value)
            except ValueError:
                raise SaliencyError(f"--tolerance {pair!r}: {value!r} is not a number") from None
        return cls(**values)


# --- graph structure ------------------------------------------------------------------------------------------

@dataclass
class LayerNode:
    name: str
    op: str
    output: str
    signature: tuple
    shape: tuple | None                       # output shape without the batch axis
    weight: np.ndarray | None = None          # Conv: OIHW; Gemm/MatMul: (out, in)
    bias: np.ndarray | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.op})"


def layer_nodes(model) -> list[LayerNode]:
    """The compute nodes the class scores depend on, in graph order, with their normalised weights."""
    g = model.canonical.graph
    inits, infos = initializers(g), tensor_infos(model.canonical)
    needed = ancestors(g, [model.score_tensor])
    out = []
    for node in g.node:
        if node.op_type in SHAPE_OPS or node.op_type == "Constant" or node.output[0] not in needed:
            continue
        info = infos.get(node.output[0])
        shape = None if info is None or info.shape is None else tuple(info.shape[1:])
        weight, bias = _weights(node, inits)
        a = attrs(node)
        if weight is not None:
            signature = (node.op_type if node.op_type == "Conv" else "Dense", weight.shape, a.get("group", 1),
                         tuple(a.get("strides", ())))
        elif node.op_type in ("MaxPool", "AveragePool"):
            signature = (node.op_type, tuple(a.get("kernel_shape", ())), tuple(a.get("strides", ())))
        else:
            signature = (node.op_type,)
        out.append(LayerNode(node.name, node.op_type, node.output[0], signature, shape, weight, bias))
    return out


def _weights(node, inits):
    if node.op_type not in LINEAR or len(node.input) < 2 or node.input[1] not in inits:
        return None, None
    w = tensor_array(inits[node.input[1]]).astype(np.float64)
    a = attrs(node)
    if node.op_type == "Conv":
        units = w.shape[0]
    elif node.op_type == "Gemm":
        w = (w if a.get("transB", 0) else w.T) * a.get("alpha", 1.0)
        units = w.shape[0]
    else:
        if w.ndim != 2:
            return None, None
        w, units = w.T, w.shape[1]
    bias = np.zeros(units)
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in inits:
        scale = a.get("beta", 1.0) if node.op_type == "Gemm" else 1.0
        b = tensor_array(inits[node.input[2]]).astype(np.float64).reshape(-1) * scale
        if b.size in (1, units):
            bias = np.broadcast_to(b, (units,)).copy()
    return w, bias


def align(a: list[LayerNode], b: list[LayerNode]) -> list[tuple[int, int]]:
    """Index pairs of the longest common subsequence of op signatures (graph order preserved)."""
    n, m = len(a), len(b)
    lcs = np.zeros((n + 1, m + 1), np.int32)
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            lcs[i, j] = lcs[i + 1, j + 1] + 1 if a[i].signature == b[j].signature else max(lcs[i + 1, j],
                                                                                            lcs[i, j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if a[i].signature == b[j].signature:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif lcs[i + 1, j] >= lcs[i, j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(a).max()) if a.size else 0.0
    return float(np.abs(a - b).max()) / max(scale, 1e-12) if a.size else 0.0


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """r of two arrays; two constant arrays agree (1) when equal, a constant and a varying one do not (0)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((da * da).sum()), np.sqrt((db * db).sum())
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
    flat_a, flat_b = na <= 1e-7 * scale * np.sqrt(a.size), nb <= 1e-7 * scale * np.sqrt(b.size)
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b and np.allclose(a, b, rtol=1e-5, atol=1e-7 * scale) else 0.0
    return float((da * db).sum() / (na * nb))


def unit_scaled(m: np.ndarray, signed: bool) -> np.ndarray:
    """A map on a common scale: signed maps divided by max |value| (to [-1, 1]), others min-max to [0, 1];
    a constant map becomes zeros."""
    m = np.asarray(m, np.float64)
    if signed:
        peak = np.abs(m).max()
        return m / peak if peak > 0 else m * 0
    span = np.ptp(m)
    return (m - m.min()) / span if span > 0 else m * 0


def ssim(a: np.ndarray, b: np.ndarray, signed: bool) -> float | None:
    """SSIM (sanity.ssim: skimage's Gaussian-window SSIM) of two maps scaled alike: unsigned maps min-max to
    [0, 1] (data range 1), signed maps divided by max |value| to [-1, 1] (data range 2). None for maps smaller
    than the window."""
    from ..evaluation.sanity import ssim as _ssim

    try:
        return float(_ssim(unit_scaled(a, signed), unit_scaled(b, signed), data_range=2.0 if signed else 1.0))
    except SaliencyError:
        return None


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the pixels at or above each map's (1 - fraction) quantile (the most salient ones, by value)."""
    sa = a >= np.quantile(a, 1 - fraction)
    sb = b >= np.quantile(b, 1 - fraction)
    union = np.logical_or(sa, sb).sum()
    return float(np.logical_and(sa, sb).sum() / union) if union else 1.0


# --- the audit ------------------------------------------------------------------------------------------------

@dataclass
class Pair:
    a: LayerNode
    b: LayerNode | None
    basis: str                       # weights | op | activation | unmatched
    weight_diff: float | None = None
    activation_diff: float | None = None
    activation_r: float | None = None
    cam_r: float | None = None
    note: str = ""

    def diverges(self, tol: Tolerances) -> list[str]:
        """Forward reasons only: a gradient map at a layer also moves when anything *after* it differs, so
        Grad-CAM agreement is reported separately (first_cam_divergence), never used to locate a divergence."""
        why = []
        if self.weight_diff is not None and self.weight_diff > tol.weights:
            why.append(f"weights differ (rel {self.weight_diff:.3g})")
        if self.activation_diff is not None and self.activation_diff > tol.activations:
            why.append(f"activations differ (rel {self.activation_diff:.3g}, r {self.activation_r:.6f})")
        return why

    def row(self) -> dict:
        return {"a_node": self.a.name, "a_op": self.a.op, "a_tensor": self.a.output,
                "b_node": self.b.name if self.b else None, "b_op": self.b.op if self.b else None,
                "b_tensor": self.b.output if self.b else None, "matched_by": self.basis,
                "weight_rel_diff": self.weight_diff, "activation_rel_diff": self.activation_diff,
                "activation_pearson": self.activation_r, "gradcam_pearson": self.cam_r, "note": self.note}


@dataclass
class AuditResult:
    models: dict
    images: list[str]
    tolerances: Tolerances
    predictions: list[dict]
    pairs: list[Pair]
    unmatched_b: list[str]
    explanations: dict
    failures: list[str] = field(default_factory=list)
    first_diverging: dict | None = None
    first_cam_divergence: dict | None = None
    layer_images: int = 0
    maps: dict = field(default_factory=dict)      # method -> (maps A, maps B, signed)
    display: np.ndarray | None = None

    @property
    def agree(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {"agree": self.agree, "failures": self.failures, "models": self.models, "images": self.images,
                "tolerances": dataclasses.asdict(self.tolerances), "predictions": self.predictions,
                "structure": {"pairs": [p.row() for p in self.pairs], "unmatched_b": self.unmatched_b,
                              "first_diverging_layer": self.first_diverging,
                              "first_gradcam_divergence": self.first_cam_divergence,
                              "images_used": self.layer_images},
                "explanations": self.explanations}


def audit(path_a, path_b, images, methods=("gradcam",), *, preset_a=None, preset_b=None, layer="auto",
          tolerances: Tolerances | None = None, options: dict | None = None, batch_size: int = 16,
          provider: str = "cpu", threads: int | None = None, progress=None) -> AuditResult:
    """`progress(units)` hears of the work done: one unit for the predictions, one for the layer-by-layer
    structure, one per method (:func:`progress_units` in all)."""
    step = progress or (lambda n: None)
    tol = tolerances or Tolerances()
    options = dict(options or {})
    method_objs = [get_method(m) for m in methods]
    ex_a = Explainer(path_a, preset=preset_a, provider=provider, threads=threads, fuse_affine=True)
    ex_b = Explainer(path_b, preset=preset_b, provider=provider, threads=threads, fuse_affine=True)
    ma, mb = ex_a.model, ex_b.model
    if ma.num_classes != mb.num_classes:
        raise SaliencyError(f"{mb.path}: {mb.num_classes} classes but {ma.path.name} has {ma.num_classes}; "
                            "the audit compares class scores one to one")
    images = list(images)
    if not images:
        raise SaliencyError("audit: no images given")
    x_a, display = ex_a.prepare(images)
    x_b, _ = ex_b.prepare(images)
    out_a = ex_a.engine.forward(x_a, batch_size)
    out_b = ex_b.engine.forward(x_b, batch_size)
    logits_a, logits_b = out_a[ma.score_tensor], out_b[mb.score_tensor]
    targets = out_a["target_class"].astype(np.int64)  # both models explain A's top-1 classes
    names = [Path(p).name if isinstance(p, (str, Path)) else f"image{i}" for i, p in enumerate(images)]

    result = AuditResult(
        models={"a": {**_describe(ma), "assumptions": ex_a.assumptions},
                "b": {**_describe(mb), "assumptions": ex_b.assumptions}}, images=names, tolerances=tol,
        predictions=_predictions(names, logits_a, logits_b, ma, mb), pairs=[], unmatched_b=[], explanations={},
        display=display)
    _check_predictions(result, logits_a, logits_b)
    step(1)

    pairs, unmatched_b = _structure(ex_a, ex_b, x_a, x_b, targets, batch_size)
    result.pairs, result.unmatched_b, result.layer_images = pairs, unmatched_b, min(len(x_a), LAYER_IMAGES)
    step(1)
    for p in pairs:
        why = p.diverges(tol)
        if why and result.first_diverging is None:
            result.first_diverging = {**p.row(), "why": why}
            result.failures.append(f"first diverging layer: {p.a.describe()} <-> "
                                   f"{p.b.describe() if p.b else '?'}: {'; '.join(why)}")
    for p in pairs:
        if p.cam_r is not None and p.cam_r < tol.layer_cam:
            result.first_cam_divergence = {"a_node": p.a.name, "b_node": p.b.name if p.b else None,
                                           "gradcam_pearson": p.cam_r, "threshold": tol.layer_cam}
            result.failures.append(f"Grad-CAM agreement first drops below {tol.layer_cam:g} at {p.a.describe()} "
                                   f"<-> {p.b.describe() if p.b else '?'} (r {p.cam_r:.4f})")
            break

    tensor_map = {p.a.output: p.b.output for p in pairs if p.b is not None}
    layer_a = ex_a.resolve_layer(layer)
    layer_b = _matched_layer(layer_a, tensor_map, ex_a, ex_b)
    for m in method_objs:
        layers_a, layers_b = ([layer_a], [layer_b]) if m.uses_layer else ([], [])
        ra = m.explain(Request(ex_a.engine, x_a, targets, layers_a, dict(options), batch_size))
        rb = m.explain(Request(ex_b.engine, x_b, targets, layers_b, dict(options), batch_size))
        maps_a, maps_b = ra.maps, rb.maps
        if maps_b.shape[1:] != maps_a.shape[1:]:
            maps_b = resize_maps(maps_b, maps_a.shape[1:])
        rows = []
        for i, name in enumerate(names):
            rows.append({"image": name, "pearson": pearson(maps_a[i], maps_b[i]),
                         "ssim": ssim(maps_a[i], maps_b[i], ra.signed), "iou_top10": top_iou(maps_a[i], maps_b[i])})
        result.explanations[m.name] = {"layer_a": layers_a[0] if layers_a else None,
                                       "layer_b": layers_b[0] if layers_b else None, "signed": ra.signed,
                                       "per_image": rows}
        result.maps[m.name] = (maps_a, maps_b, ra.signed)
        for r in rows:
            for key in ("pearson", "ssim", "iou_top10"):
                limit = getattr(tol, "iou" if key == "iou_top10" else key)
                if limit > 0 and r[key] is not None and r[key] < limit:
                    result.failures.append(f"{m.name} on {r['image']}: {key} {r[key]:.4f} < {limit:g}")
        step(1)
    return result


def progress_units(methods) -> int:
    """How many units :func:`audit` reports to `progress`."""
    return 2 + len(methods)


def _describe(m) -> dict:
    return {"path": str(m.path), "sha256": m.sha256, "input": m.input_name, "layout": m.layout,
            "score_tensor": m.score_tensor, "classes": m.num_classes, "rewrite": m.report.lines()}


def _predictions(names, la, lb, ma, mb) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        top_a, top_b = np.argsort(-la[i])[:5], np.argsort(-lb[i])[:5]
        rows.append({"image": name, "top1_a": int(top_a[0]), "top1_b": int(top_b[0]),
                     "label_a": ma.label(int(top_a[0])), "label_b": mb.label(int(top_b[0])),
                     "top1_agree": bool(top_a[0] == top_b[0]),
                     "top5_overlap": len(set(top_a.tolist()) & set(top_b.tolist())) / min(5, la.shape[1]),
                     "max_abs_logit_diff": float(np.abs(la[i] - lb[i]).max())})
    return rows


def _check_predictions(result: AuditResult, la, lb) -> None:
    tol = result.tolerances
    scale = max(1.0, float(np.abs(la).max()))
    worst = float(np.abs(la - lb).max())
    if worst > tol.logits * scale:
        result.failures.append(f"logits: max |delta| {worst:.4g} > {tol.logits:g} x {scale:.4g}")
    agree = np.mean([r["top1_agree"] for r in result.predictions])
    if agree < tol.top1:
        result.failures.append(f"top-1 agreement {agree:.0%} < {tol.top1:.0%}")


def _structure(ex_a, ex_b, x_a, x_b, targets, batch_size):
    a_nodes, b_nodes = layer_nodes(ex_a.model), layer_nodes(ex_b.model)
    aligned = dict(align(a_nodes, b_nodes))
    pairs = []
    for i, node in enumerate(a_nodes):
        if i in aligned:
            partner = b_nodes[aligned[i]]
            pair = Pair(node, partner, "weights" if node.weight is not None else "op")
            if node.weight is not None and partner.weight is not None:
                pair.weight_diff = max(relative_difference(node.weight, partner.weight),
                                       relative_difference(node.bias, partner.bias))
        else:
            pair = Pair(node, None, "unmatched")
        pairs.append(pair)
    n = min(len(x_a), LAYER_IMAGES)
    act_a = _activations(ex_a, x_a[:n], targets[:n], [p.a for p in pairs], batch_size)
    taken = {p.b.output for p in pairs if p.b is not None}
    free_b = [b for b in b_nodes if b.output not in taken]
    act_b = _activations(ex_b, x_b[:n], targets[:n], [p.b for p in pairs if p.b is not None] + free_b, batch_size)
    for pair in pairs:
        if pair.b is None:
            _match_by_activation(pair, free_b, act_a, act_b)
            if pair.b is not None:
                free_b = [b for b in free_b if b is not pair.b]
        if pair.b is None:
            continue
        a, b = act_a["act"].get(pair.a.output), act_b["act"].get(pair.b.output)
        if a is None or b is None or a.shape != b.shape:
            pair.note = "output shapes differ" if a is not None and b is not None else ""
            continue
        pair.activation_diff, pair.activation_r = relative_difference(a, b), pearson(a, b)
        ca, cb = act_a["cam"].get(pair.a.output), act_b["cam"].get(pair.b.output)
        if ca is not None and cb is not None:
            pair.cam_r = min(pearson(ca[k], cb[k]) for k in range(len(ca)))
    return pairs, [b.describe() for b in free_b]


def _spatial(node: LayerNode) -> bool:
    return node.shape is not None and len(node.shape) == 3 and (node.shape[1] or 0) * (node.shape[2] or 0) > 1


def _activations(ex, x, targets, nodes, batch_size) -> dict:
    """Activations of every node and, at spatial ones, the Grad-CAM map (ReLU, per-image min-max)."""
    tensors = sorted({n.output for n in nodes if n is not None})
    spatial = sorted({n.output for n in nodes if n is not None and _spatial(n)})
    out = ex.engine.run(x, targets, expose=tensors, wrt=spatial, batch_size=batch_size)
    cams = {}
    for t in spatial:
        A, G = out[t], out[grad_name(t)]
        cams[t] = scale_cam_image(np.maximum(np.einsum("nk,nkhw->nhw", G.mean(axis=(2, 3)), A), 0))
    return {"act": {t: out[t] for t in tensors}, "cam": cams}


def _match_by_activation(pair: Pair, free_b, act_a, act_b) -> None:
    a = act_a["act"].get(pair.a.output)
    if a is None:
        return
    best, best_r = None, 0.999  # only a near-identical activation counts as the same layer
    for b in free_b:
        v = act_b["act"].get(b.output)
        if v is not None and v.shape == a.shape:
            r = pearson(a, v)
            if r >= best_r:
                best, best_r = b, r
    if best is not None:
        pair.b, pair.basis = best, "activation"
        if pair.a.weight is not None and best.weight is not None and pair.a.weight.shape == best.weight.shape:
            pair.weight_diff = relative_difference(pair.a.weight, best.weight)


def _matched_layer(layer_a: str, tensor_map: dict, ex_a, ex_b) -> str:
    if layer_a in tensor_map:
        return tensor_map[layer_a]
    # A's layer may be a shape op's output (not a compute node): fall back to B's own choice
    return ex_b.resolve_layer("auto")
