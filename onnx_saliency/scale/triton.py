"""A Triton Inference Server model repository for an explain graph (``export-explainer --triton DIR``).

Layout: ``DIR/<name>/config.pbtxt`` and ``DIR/<name>/<version>/model.onnx``, served by Triton's onnxruntime
backend next to the classifier itself. The config lists every input and output of the graph with its Triton
data type and its dims without the batch dimension (``max_batch_size`` > 0, dynamic batching on); tensors that
are one value per image (``targets``, ``target_class``, ``target_score``) are declared ``dims: [ 1 ]`` with
``reshape: { shape: [ ] }``, Triton's convention for rank-1 batched tensors. Dynamic dims become ``-1``.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from ..errors import SaliencyError
from ..output.writers import ensure_dir, write_bytes

TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16", onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


def _dims(vi: onnx.ValueInfoProto) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]


def _tensor(vi: onnx.ValueInfoProto, batched: bool) -> str:
    dtype = TRITON_TYPES.get(vi.type.tensor_type.elem_type)
    if dtype is None:
        raise SaliencyError(f"--triton: tensor {vi.name!r} has an element type Triton cannot carry")
    dims = _dims(vi)
    if dims is None:
        raise SaliencyError(f"--triton: tensor {vi.name!r} has no known rank; Triton needs its dims")
    inner = dims[1:] if batched else dims
    lines = [f'    name: "{vi.name}"', f"    data_type: {dtype}"]
    if batched and not inner:  # one value per image: Triton batches [1] and hands the model [N]
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        lines.append(f"    dims: [ {', '.join(str(d) for d in inner)} ]")
    return "  {\n" + "\n".join(lines) + "\n  }"


def triton_config(graph: onnx.ModelProto, name: str, max_batch_size: int = 16, kind: str = "cpu",
                  instances: int = 1) -> str:
    """config.pbtxt for `graph`. Batched (dynamic batching) when every input and output has a dynamic
    first dimension, as exported explain graphs do; otherwise max_batch_size 0 and the full shapes."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SaliencyError(f"--triton-name {name!r}: use letters, digits, '_', '-' and '.' only")
    if kind not in KINDS:
        raise SaliencyError(f"--triton-kind {kind!r}: expected cpu or gpu")
    if max_batch_size < 0 or instances < 1:
        raise SaliencyError("--max-batch-size must be 0 or more and the instance count at least 1")
    tensors = list(graph.graph.input) + list(graph.graph.output)
    inits = {t.name for t in graph.graph.initializer}
    inputs = [vi for vi in graph.graph.input if vi.name not in inits]
    batched = max_batch_size > 0 and all((_dims(vi) or [0])[:1] == [-1] for vi in tensors if vi.name not in inits)
    parts = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size if batched else 0}",
             "input [\n" + ",\n".join(_tensor(vi, batched) for vi in inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor(vi, batched) for vi in graph.graph.output) + "\n]",
             f"instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[kind]}\n  }}\n]"]
    if batched:
        parts.append("dynamic_batching { }")
    return "\n".join(parts) + "\n"


def write_triton_repository(graph: onnx.ModelProto, repository, name: str, version: int = 1,
                            **config) -> Path:
    """Write ``repository/name/config.pbtxt`` and ``repository/name/version/model.onnx``; returns the model
    folder. Other models already in the repository are left alone."""
    text = triton_config(graph, name, **config)
    folder = ensure_dir(Path(repository) / name)
    data = graph.SerializeToString()
    write_bytes(ensure_dir(folder / str(int(version))) / "model.onnx", data)
    write_bytes(folder / "config.pbtxt", text.encode("utf-8"))
    return folder
