"""Candidate layers (spatial feature maps) of a classifier, and the `auto` choice."""

from __future__ import annotations

from dataclasses import dataclass

from graph_passes._graph import ancestors, initializers, producers, tensor_infos

from ..errors import SaliencyError
from .model import LoadedModel

# Ops whose output is the same feature map seen through a different shape: never a "layer" of their own.
_SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast"}
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "AveragePool"}


@dataclass(frozen=True)
class Layer:
    tensor: str
    node: str
    op: str
    shape: tuple

    def describe(self) -> str:
        dims = "x".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.tensor}\t{self.node}\t{self.op}\t{dims}"


def candidate_layers(model: LoadedModel) -> list[Layer]:
    """Every 4-D float tensor with spatial extent that the class scores depend on, in graph order."""
    g = model.canonical.graph
    infos = tensor_infos(model.canonical)
    needed = ancestors(g, [model.score_tensor])
    out = []
    for node in g.node:
        if node.op_type in _SHAPE_OPS:
            continue
        for name in node.output:
            info = infos.get(name)
            if (name in needed and info is not None and info.is_float and info.shape is not None
                    and len(info.shape) == 4 and (info.shape[2] or 0) * (info.shape[3] or 0) > 1):
                out.append(Layer(name, node.name, node.op_type, info.shape))
    return out


def auto_layer(model: LoadedModel) -> str:
    """The last spatial feature map before global pooling: walk back from the scores along activations."""
    known = model.known
    if known and known.get("default_layer"):
        return known["default_layer"]
    meta = model.metadata.get("onnx_saliency.default_layer")
    if meta:
        return meta
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
    """`auto`, a tensor name, a node name, or a (negative) index into candidate_layers()."""
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
    raise SaliencyError(f"--layer {spec!r}: no such tensor or node in {model.path.name} "
                        f"(see `onnx-saliency layers {model.path}`)")
