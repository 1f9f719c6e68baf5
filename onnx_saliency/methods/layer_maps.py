"""Helpers shared by the seed methods that build their own graphs: layer checks, tensor lookup, and the
multi-layer aggregation the CAM family uses (per layer min-max + resize, mean, min-max again)."""

from __future__ import annotations

import numpy as np

from graph_passes._graph import producers, tensor_infos

from ..errors import SaliencyError
from ..output.postprocess import scale_cam_image


def combine_layer_maps(raws: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) maps per layer -> (N, H, W) in [0, 1], as CAMMethod aggregates several layers."""
    per_layer = [scale_cam_image(np.asarray(r, np.float32), size) for r in raws]
    return scale_cam_image(np.mean(per_layer, axis=0)).astype(np.float32)


def spatial(A: np.ndarray, method: str, layer: str) -> np.ndarray:
    if A.ndim != 4:
        raise SaliencyError(f"-m {method}: layer {layer!r} has shape {A.shape}, expected (N, C, h, w)")
    return A


def tensor_or_node(model, spec: str, option: str) -> str:
    """A tensor of the canonical graph named directly, or by the node producing it (its first output)."""
    g = model.canonical.graph
    infos = tensor_infos(model.canonical)
    if spec in infos or spec in producers(g):
        return spec
    for node in g.node:
        if node.name == spec:
            return node.output[0]
    raise SaliencyError(f"--option {option}={spec!r}: no such tensor or node in {model.path.name} "
                        f"(see `onnx-saliency layers {model.path}`)")
