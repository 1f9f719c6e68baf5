"""Memory estimates: bytes of activations per image, from shape inference at the real input size."""

from __future__ import annotations

import numpy as np
import onnx

from ..intake.model import LoadedModel

DEFAULT_MEMORY_BUDGET = 2 << 30
# Calibration (EfficientNet-Lite0, 224x224, onnxruntime 1.31 CPU): all activations of one image sum to 50 MiB;
# the resident set grew by 29 MiB per image for input gradients and by 8 MiB for a forward pass (buffers of
# dead tensors are reused). The estimate is the sum for graphs with a backward part and a quarter of it
# without: an upper bound with some margin, not a measurement.
FORWARD_SHARE = 4


def activation_bytes(model: LoadedModel, hw: tuple[int, int]) -> int:
    """Bytes of every intermediate tensor for one image of size `hw` (unknown dims count as 1)."""
    from graph_passes._graph import infer, skeleton, tensor_infos

    # shape inference only needs the weights' shapes: work on the weight-free skeleton
    m = skeleton(model.canonical)
    for vi in m.graph.input:
        if vi.name == model.input_name:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, (1, model.channels, *hw)):
                d.Clear()
                d.dim_value = v
    del m.graph.value_info[:]
    try:
        infos = tensor_infos(infer(m))
    except Exception:  # inference is an estimate's helper: fall back to the canonical graph's shapes
        infos = tensor_infos(model.canonical)
    weights = {i.name for i in model.canonical.graph.initializer}
    total = 0
    for name, info in infos.items():
        if name in weights or info.shape is None:
            continue
        size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(info.elem_type)).itemsize \
            if info.elem_type not in (0, onnx.TensorProto.STRING) else 8
        total += size * int(np.prod([d or 1 for d in info.shape], dtype=np.int64))
    return max(total, 1)
