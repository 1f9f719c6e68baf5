"""Candidate layers (spatial feature maps) of a classifier, the `auto` choice, and the torch module paths
that dynamo exports record per node (their node names, ``relu_16``, say nothing; ``layer4.1.relu`` does)."""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np

from graph_passes._graph import ancestors, attrs, consumers, initializers, producers, tensor_infos

from ..errors import SaliencyError
from .model import LoadedModel

# Ops whose output is the same feature map seen through a different shape: never a "layer" of their own.
_SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast"}
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "AveragePool"}


# torch.onnx (dynamo) writes the module scopes of each node: ['', 'layer4', 'layer4.1', 'layer4.1.relu', 'relu_16']
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class Layer:
    tensor: str
    node: str
    op: str
    shape: tuple
    module: str | None = None  # the torch module path, where the export recorded it

    def describe(self, with_module: bool = False) -> str:
        dims = "x".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.tensor}\t{self.node}\t{self.op}\t{dims}" + (f"\t{self.module or '-'}" if with_module else "")


def _module_of(node) -> str | None:
    """The module path of a node from its name-scope metadata (the last scope is the op's own name)."""
    text = next((p.value for p in getattr(node, "metadata_props", ()) if p.key == NAME_SCOPES), None)
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(scopes, (list, tuple)) or len(scopes) < 2 or not isinstance(scopes[-2], str):
        return None
    return scopes[-2] or None  # '' is the root module: a function called in forward()


def module_paths(model: LoadedModel) -> dict[str, str]:
    """Canonical node name -> torch module path, read from the original export (canonicalisation drops node
    metadata but keeps node names; a node it renamed is found through the tensor it writes)."""
    if model.module_cache is not None:
        return model.module_cache
    model.module_cache = _module_paths(model)
    return model.module_cache


def _module_paths(model: LoadedModel) -> dict[str, str]:
    by_node, by_tensor = {}, {}
    for node in model.original.graph.node:
        module = _module_of(node)
        if module:
            by_node[node.name] = module
            by_tensor.update(dict.fromkeys(node.output, module))
    if not by_node:
        return {}
    out = {}
    for node in model.canonical.graph.node:
        module = by_node.get(node.name) or next((by_tensor[t] for t in node.output if t in by_tensor), None)
        if module:
            out[node.name] = module
    return out


@dataclass(frozen=True)
class SpatialView:
    """How a layer's tensor is a feature map: NCHW as is, channels-last (Swin's (N, h, w, C) blocks), or a
    transformer's (N, T, C) tokens with `prefix` class/distillation/register tokens before an h x w grid.
    `to_nchw` is pytorch-grad-cam's documented reshape_transform for each case."""

    layout: str  # "NCHW" | "NHWC" | "NTC"
    prefix: int = 0
    grid: tuple = ()

    def to_nchw(self, a: np.ndarray) -> np.ndarray:
        if self.layout == "NHWC":
            return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
        if self.layout == "NTC":
            h, w = self.grid
            return np.ascontiguousarray(a[:, self.prefix:].reshape(a.shape[0], h, w, a.shape[2]).transpose(0, 3, 1, 2))
        return a

    def describe(self) -> str:
        if self.layout == "NTC":
            return f"tokens: {self.prefix} prefix + {self.grid[0]}x{self.grid[1]} grid"
        return self.layout


def _is_channels_last(g, tensor: str, prod, cons) -> bool:
    """A rank-4 tensor normalised over its last axis (written or read by a LayerNormalization on axis -1) is
    channels-last: Swin keeps (N, h, w, C) through its blocks, ConvNeXt inside its blocks."""
    nodes = ([prod[tensor]] if tensor in prod else []) + list(cons.get(tensor, []))
    return any(n.op_type == "LayerNormalization" and attrs(n).get("axis", -1) in (-1, 3) for n in nodes)


def _patch_grid(g, tensor: str, tokens: int, infos, prod) -> tuple | None:
    """(prefix, (h, w)) of an (N, T, C) token tensor: the grid of the last patch-embedding Conv it depends on
    (T = prefix + h*w; a ViT's conv_proj, DeiT's patch_embed.proj)."""
    before = ancestors(g, [tensor])
    best = None
    for node in g.node:
        if node.op_type != "Conv" or node.output[0] not in before:
            continue
        info = infos.get(node.output[0])
        if info is None or info.shape is None or len(info.shape) != 4 or None in info.shape[2:]:
            continue
        h, w = info.shape[2:]
        if 1 < h * w <= tokens and tokens - h * w < 16:
            best = (tokens - h * w, (h, w))
    return best


def spatial_view(model: LoadedModel, tensor: str) -> SpatialView | None:
    """The feature-map view of `tensor` (None: not a spatial map: a vector, or tokens without a patch grid)."""
    g = model.canonical.graph
    infos = tensor_infos(model.canonical)
    info = infos.get(tensor)
    if info is None or info.shape is None:
        return None
    shape = info.shape
    if len(shape) == 4:
        if _is_channels_last(g, tensor, producers(g), consumers(g)):
            return SpatialView("NHWC") if (shape[1] or 0) * (shape[2] or 0) > 1 else None
        return SpatialView("NCHW") if (shape[2] or 0) * (shape[3] or 0) > 1 else None
    if len(shape) == 3 and shape[1] is not None:
        found = _patch_grid(g, tensor, shape[1], infos, producers(g))
        if found is not None:
            return SpatialView("NTC", found[0], found[1])
    return None


def candidate_layers(model: LoadedModel) -> list[Layer]:
    """Every float tensor that is a spatial feature map (NCHW, channels-last, or transformer tokens on a patch
    grid) and that the class scores depend on, in graph order."""
    g = model.canonical.graph
    infos = tensor_infos(model.canonical)
    needed = ancestors(g, [model.score_tensor])
    modules = module_paths(model)
    prod, cons = producers(g), consumers(g)
    out = []
    for node in g.node:
        if node.op_type in _SHAPE_OPS:
            continue
        for name in node.output:
            info = infos.get(name)
            if name not in needed or info is None or not info.is_float or info.shape is None:
                continue
            shape = info.shape
            if len(shape) == 4:
                spatial = (shape[1] or 0) * (shape[2] or 0) if _is_channels_last(g, name, prod, cons) \
                    else (shape[2] or 0) * (shape[3] or 0)
                ok = spatial > 1
            elif len(shape) == 3 and shape[1] is not None:
                ok = _patch_grid(g, name, shape[1], infos, prod) is not None  # tokens after a patch embedding
            else:
                ok = False
            if ok:
                out.append(Layer(name, node.name, node.op_type, shape, modules.get(node.name)))
    return out


def module_of_tensor(model: LoadedModel, tensor: str) -> str | None:
    """The torch module path of the node that writes `tensor`, where the export recorded one."""
    modules = module_paths(model)
    node = producers(model.canonical.graph).get(tensor)
    return modules.get(node.name) if node is not None else None


def _by_module(model: LoadedModel, layers: list[Layer], spec: str) -> str | None:
    """A module path (or a container's): the last spatial layer it writes, as a forward hook on it sees the
    output of its last call; else the last tensor it writes that the scores depend on."""
    inside = [l for l in layers if l.module and (l.module == spec or l.module.startswith(spec + "."))]
    if inside:
        return inside[-1].tensor
    modules = module_paths(model)
    needed = ancestors(model.canonical.graph, [model.score_tensor])
    written = [t for n in model.canonical.graph.node
               if modules.get(n.name) and (modules[n.name] == spec or modules[n.name].startswith(spec + "."))
               for t in n.output if t in needed]
    return written[-1] if written else None


def attention_norm(model: LoadedModel) -> str | None:
    """A transformer's conventional CAM layer, the last block's norm1 (pytorch-grad-cam's ViT/Swin examples):
    the last LayerNormalization whose output the scores depend on and an attention Softmax reads through the
    Q/K/V projections. None when the scores depend on no Softmax over a LayerNormalization."""
    g = model.canonical.graph
    needed = ancestors(g, [model.score_tensor])
    softmaxes = [n.output[0] for n in g.node if n.op_type == "Softmax" and n.output[0] in needed
                 and n.output[0] != model.score_tensor]
    if not softmaxes:
        return None
    before_attention = ancestors(g, softmaxes)
    norms = [n.output[0] for n in g.node if n.op_type == "LayerNormalization"
             and n.output[0] in before_attention and n.output[0] in needed]
    norms = [t for t in norms if spatial_view(model, t) is not None]
    return norms[-1] if norms else None


def auto_layer(model: LoadedModel) -> str:
    """Transformers: the last block's norm1 (attention_norm). Else the last spatial feature map before global
    pooling: walk back from the scores along activations."""
    known = model.known
    if known and known.get("default_layer"):
        return known["default_layer"]
    meta = model.metadata.get("onnx_saliency.default_layer")
    if meta:
        return meta
    norm1 = attention_norm(model)
    if norm1 is not None:
        return norm1
    g = model.canonical.graph
    prod, inits, infos = producers(g), initializers(g), tensor_infos(model.canonical)
    t = model.score_tensor
    while True:
        info, node = infos.get(t), prod.get(t)
        # a Reshape/Transpose of a pooled vector can look 4-D and "spatial" (tf2onnx's (N,1,1,C)): skip those
        if info is not None and info.shape is not None and len(info.shape) == 4 and \
                (info.shape[2] or 0) * (info.shape[3] or 0) > 1 and (node is None or node.op_type not in _SHAPE_OPS):
            return t
        if node is None:
            raise SaliencyError(f"{model.path}: found no spatial feature map before the class scores; pass --layer")
        activations = [i for i in node.input if i and i not in inits and i in prod or i == model.input_name]
        if not activations:
            raise SaliencyError(f"{model.path}: found no spatial feature map before the class scores; pass --layer")
        t = activations[0]


def resolve_layer(model: LoadedModel, spec: str | None) -> str:
    """`auto`, a tensor name, a node name, a (negative) index into candidate_layers(), or a torch module path
    (dynamo exports)."""
    if spec in (None, "", "auto"):
        return auto_layer(model)
    layers = candidate_layers(model)
    by_tensor = {l.tensor: l for l in layers}
    by_node = {l.node: l for l in layers}
    if spec in by_tensor:
        return spec
    if spec in by_node:
        return by_node[spec].tensor
    try:
        index = int(spec)
    except ValueError:
        index = None
    if index is not None and -len(layers) <= index < len(layers):
        return layers[index].tensor
    infos = tensor_infos(model.canonical)
    if spec in infos and spec in ancestors(model.canonical.graph, [model.score_tensor]):
        return spec  # a valid tensor that is not 4-D spatial: methods that accept it may use it
    found = _by_module(model, layers, spec)
    if found is not None:
        return found
    raise SaliencyError(f"--layer {spec!r}: no such tensor, node or module in {model.path.name} "
                        f"(see `onnx-saliency layers {model.path}`)")


@dataclass(frozen=True)
class Attention:
    """The attention probabilities of a transformer, block by block: Softmax outputs shaped (..., T, T) over the
    whole token sequence (prefix tokens + an h x w patch grid)."""

    tensors: tuple  # Softmax outputs in graph (= block) order
    tokens: int
    prefix: int
    grid: tuple


def attention_probabilities(model: LoadedModel) -> Attention:
    """Find the global self-attention Softmax outputs the scores depend on. Raises SaliencyError naming what was
    found when there are none, or when attention is not over one token sequence with a patch grid (Swin's
    windowed attention: rollout would need the window partition and shifts undone block by block)."""
    g = model.canonical.graph
    infos = tensor_infos(model.canonical)
    needed = ancestors(g, [model.score_tensor])
    softmaxes = [n for n in g.node if n.op_type == "Softmax" and n.output[0] in needed
                 and n.output[0] != model.score_tensor]
    if not softmaxes:
        raise SaliencyError(f"{model.path.name}: no attention Softmax before the class scores; attention methods "
                            "apply to transformers (ViT, DeiT, ...)")
    found, shapes = [], set()
    for n in softmaxes:
        info = infos.get(n.output[0])
        shape = None if info is None else info.shape
        if shape is None or len(shape) < 3 or shape[-1] is None or shape[-1] != shape[-2] \
                or attrs(n).get("axis", -1) not in (-1, len(shape) - 1):
            raise SaliencyError(f"{model.path.name}: Softmax node {n.name!r} has output shape {shape}; attention "
                                "methods need (..., T, T) attention probabilities over the last axis")
        found.append(n.output[0])
        shapes.add(shape[-1])
    if len(shapes) != 1:
        raise SaliencyError(f"{model.path.name}: attention over token counts {sorted(shapes)}; attention rollout "
                            "needs every block to attend over the same tokens (hierarchical or windowed "
                            "transformers such as Swin are not supported: use gradcam or lrp)")
    tokens = shapes.pop()
    grid = _patch_grid(g, found[0], tokens, infos, producers(g))
    if grid is None:
        raise SaliencyError(f"{model.path.name}: attention over {tokens} tokens is not a patch grid plus prefix "
                            "tokens (windowed attention, as in Swin, is not supported by attention rollout: use "
                            "gradcam or lrp)")
    return Attention(tuple(found), tokens, grid[0], grid[1])


def has_attention(model: LoadedModel) -> bool:
    """The scores depend on a Softmax that is not the scores' own: a transformer's attention."""
    g = model.canonical.graph
    needed = ancestors(g, [model.score_tensor])
    return any(n.op_type == "Softmax" and n.output[0] in needed and n.output[0] != model.score_tensor
               for n in g.node)


def refuse_transformer(model: LoadedModel, method: str, needs: str) -> None:
    """Methods defined on CNN structure refuse attention models before running, saying what they need."""
    if has_attention(model):
        raise SaliencyError(f"-m {method}: {model.path.name} is a transformer (attention Softmax nodes); {needs}. "
                            "For transformers use gradcam (token maps), rollout, gradient-rollout or lrp with "
                            "--composite attnlrp / cp-lrp")
