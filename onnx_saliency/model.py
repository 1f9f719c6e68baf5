"""Model intake: load, validate, canonicalise, and find the image input and the class-score tensor."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper

import graph_passes as gp
from graph_passes._graph import graph_inputs, producers, tensor_infos

from .errors import SaliencyError, UnsupportedModelError
from .preprocess import Preprocessing, labels_from_metadata

MAX_MODEL_BYTES = 2 ** 31 - 1  # protobuf's own limit: larger models must keep weights as external data


@dataclass
class LoadedModel:
    path: Path
    sha256: str
    original: onnx.ModelProto
    canonical: onnx.ModelProto
    report: gp.CanonicalizeReport
    input_name: str            # the (canonical, NCHW) image input
    layout: str                # the layout the *original* model takes: NCHW or NHWC
    input_hw: tuple            # (H, W), None where dynamic
    channels: int
    output_name: str           # the graph output the user sees
    score_tensor: str          # the pre-softmax scores we explain
    num_classes: int
    metadata: dict = field(default_factory=dict)
    labels: list | None = None

    def label(self, index: int) -> str:
        if self.labels and 0 <= index < len(self.labels):
            return str(self.labels[index])
        return str(index)

    @property
    def known(self) -> dict | None:
        """The manifest entry of a model we ship or test with, recognised by its sha256."""
        from .models import lookup

        return lookup(self.sha256)

    def preprocessing(self) -> Preprocessing:
        """Defaults: the model's metadata keys, else its manifest entry, else torchvision at the input size.

        Always NCHW: canonicalisation absorbed any NHWC input transpose, so the engine feeds NCHW."""
        if any(k.startswith("onnx_saliency.") for k in self.metadata) or self.known is None:
            return Preprocessing.from_metadata(self.metadata, layout="NCHW", input_hw=self.input_hw)
        k = self.known
        return Preprocessing(preset=k["preset"], resize=k.get("resize"), crop=k.get("crop"),
                             resize_mode=k.get("resize_mode", "shorter"), layout="NCHW")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_external_data(model: onnx.ModelProto, folder: Path, path: Path) -> None:
    """External tensors may only live inside the model's own folder (no absolute paths, '..' or symlink escapes)."""
    root = folder.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise SaliencyError(f"{path}: external data of tensor {tensor.name!r} points outside the model folder "
                                f"({location!r}); refusing to read it")
        if not target.is_file():
            raise SaliencyError(f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing")


def read_model(path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise SaliencyError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise SaliencyError(f"{path}: not a readable ONNX model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'parse error'})") from err
    if not model.graph.node:
        raise SaliencyError(f"{path}: not an ONNX model (no graph nodes)")
    _check_external_data(model, path.parent, path)
    if any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)):
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise SaliencyError(f"{path}: invalid ONNX model: {str(err).splitlines()[0]}") from err
    return model


def _find_image_input(model: onnx.ModelProto, path: Path):
    candidates = []
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(dims) == 4:
            candidates.append(vi)
    if len(candidates) != 1:
        names = [vi.name for vi in graph_inputs(model)]
        raise SaliencyError(f"{path}: expected exactly one 4-D float image input, found inputs {names}")
    return candidates[0]


def _score_tensor(model: onnx.ModelProto, path: Path) -> tuple[str, str, int]:
    outputs = [o for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not outputs:
        raise SaliencyError(f"{path}: the model has no float output to explain")
    out = outputs[0]
    prod = producers(model.graph)
    score = out.name
    node = prod.get(score)
    # explain what the classifier computes before normalising into probabilities
    while node is not None and node.op_type in ("Softmax", "LogSoftmax", "Identity"):
        score = node.input[0]
        node = prod.get(score)
    info = tensor_infos(model).get(score)
    if info is None or info.shape is None or len(info.shape) != 2 or info.shape[1] is None:
        shape = None if info is None else info.shape
        raise SaliencyError(f"{path}: class scores {score!r} must have shape (N, classes), got {shape}")
    return out.name, score, int(info.shape[1])


def unsupported_nodes(model: onnx.ModelProto, output: str, rules=None) -> list[tuple[str, str]]:
    """Nodes between the image input and the scores that no backward rule covers."""
    ops = gp.supported_ops(rules)
    needed = gp._graph.ancestors(model.graph, [output])
    return [(n.name, n.op_type) for n in model.graph.node
            if n.op_type not in ops and any(o in needed for o in n.output)]


def load_model(path) -> LoadedModel:
    path = Path(path)
    original = read_model(path)
    image = _find_image_input(original, path)
    dims = image.type.tensor_type.shape.dim
    try:
        canonical, report = gp.canonicalize(original, return_report=True)
    except gp.GraphPassError as err:
        raise SaliencyError(f"{path}: {err}") from err
    output_name, score, classes = _score_tensor(canonical, path)
    missing = unsupported_nodes(canonical, score)
    if missing:
        listed = ", ".join(f"{name} ({op})" for name, op in missing)
        raise UnsupportedModelError(f"{path}: unsupported op(s) in {len(missing)} node(s): {listed}")
    layout = "NHWC" if report.absorbed_transpose else _guess_layout(dims)
    if layout == "NHWC" and not report.absorbed_transpose:
        raise UnsupportedModelError(f"{path}: NHWC input {image.name!r} is not followed by a single "
                                    "Transpose(perm=[0,3,1,2]); cannot map it to NCHW")
    cdims = _find_image_input(canonical, path).type.tensor_type.shape.dim
    static = [d.dim_value if d.HasField("dim_value") else None for d in cdims]
    metadata = {p.key: p.value for p in original.metadata_props}
    return LoadedModel(path=path, sha256=sha256_of(path), original=original, canonical=canonical, report=report,
                       input_name=image.name, layout=layout, input_hw=(static[2], static[3]),
                       channels=static[1] or 3, output_name=output_name, score_tensor=score, num_classes=classes,
                       metadata=metadata, labels=labels_from_metadata(metadata))


def _guess_layout(dims) -> str:
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if values[1] in (1, 3) or values[3] not in (1, 3):
        return "NCHW"
    return "NHWC"
