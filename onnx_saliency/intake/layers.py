"""Candidate layers (spatial feature maps) of a classifier, the `auto` choice, and the torch module paths
that dynamo exports record per node (their node names, ``relu_16``, say nothing; ``layer4.1.relu`` does)."""

from __future__ import annotations

import ast
from dataclasses import dataclass

from graph_passes._graph import ancestors, initializers, producers, tensor_infos

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


def candidate_layers(model: LoadedModel) -> list[Layer]:
    """Every 4-D float tensor with spatial extent that the class scores depend on, in graph order."""
    g = model.canonical.graph
    infos = tensor_infos(model.canonical)
    needed = ancestors(g, [model.score_tensor])
    modules = module_paths(model)
    out = []
    for node in g.node:
        if node.op_type in _SHAPE_OPS:
            continue
        for name in node.output:
            info = infos.get(name)
            if (name in needed and info is not None and info.is_float and info.shape is not None
                    and len(info.shape) == 4 and (info.shape[2] or 0) * (info.shape[3] or 0) > 1):
                out.append(Layer(name, node.name, node.op_type, info.shape, modules.get(node.name)))
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
