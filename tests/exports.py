"""Export a classifier to ONNX the ways users do, and its gradient by the framework's own autograd.

Used by the cross-framework tests (tests/test_keras_export.py), the coverage slice (tests/test_coverage_slice.py)
and benchmarks/coverage.py. Exporters:

- ``legacy``: torch.onnx.export(dynamo=False), TorchScript-based, opset 17.
- ``dynamo``: torch.onnx.export(dynamo=True), torch.export-based, the exporter's default opset.
- ``keras``:  tf2onnx.convert.from_keras, opset 17, NHWC input (the Keras layout, as users export it).

Every export has a dynamic batch axis, the input named ``input`` and the preprocessing preset written into the
file's metadata (so the Explainer needs no flags). torch and TensorFlow are imported lazily: the module is
importable without either.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np

TORCH_EXPORTERS = ("legacy", "dynamo")
EXPORTERS = TORCH_EXPORTERS + ("keras",)
LEGACY_OPSET = 17
KERAS_OPSET = 17


def _set_meta(path: Path, preset: str, size: int | None) -> None:
    import onnx

    m = onnx.load(str(path))
    props = {"onnx_saliency.preset": preset}
    if size:  # the images are resized and cropped to the export's input size
        props.update({"onnx_saliency.resize": str(size), "onnx_saliency.crop": str(size)})
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(path))


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings by the page; keep the test and benchmark output readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_torch(model, path, size: int, exporter: str = "legacy", preset: str = "torchvision",
                 channels: int = 3) -> Path:
    """Export an eval-mode torch module taking (N, channels, size, size) with `exporter` (legacy | dynamo)."""
    import torch

    path = Path(path)
    x = torch.zeros(2, channels, size, size)
    names = {"input_names": ["input"], "output_names": ["logits"],
             "dynamic_axes": {"input": {0: "N"}, "logits": {0: "N"}}}
    with _quiet():
        if exporter == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=LEGACY_OPSET, **names)
        elif exporter == "dynamo":
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, **names)
        else:
            raise ValueError(f"unknown torch exporter {exporter!r}; known: {', '.join(TORCH_EXPORTERS)}")
    _set_meta(path, preset, size)
    return path


def import_tensorflow():
    """TensorFlow with its C++ start-up chatter off; Keras 3 on the TensorFlow backend."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    return tf


def export_keras(model, path, preset: str = "tf") -> Path:
    """Export a Keras model (NHWC input of static spatial size) with tf2onnx, dynamic batch."""
    tf = import_tensorflow()
    import onnx
    import tf2onnx

    path = Path(path)
    shape = tuple(model.inputs[0].shape[1:])
    spec = (tf.TensorSpec((None, *shape), tf.float32, name="input"),)
    with _quiet():
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=KERAS_OPSET)
    onnx.save(proto, str(path))
    _set_meta(path, preset, shape[0])
    return path


def randomise_keras_bn(model, seed: int) -> None:
    """Non-trivial statistics and affine parameters for every Keras BatchNormalization (seeded), as
    tests/torch_shim.randomise_bn does for torch: fresh ones are the identity, folding them proves nothing."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            values = []
            for w in layer.weights:
                n, name = w.shape, w.path.rsplit("/", 1)[-1]
                if name == "gamma":
                    values.append(0.5 + rng.random(n))
                elif name in ("beta", "moving_mean"):
                    values.append(0.2 * rng.standard_normal(n))
                else:  # moving_variance
                    values.append(0.5 + rng.random(n))
            layer.set_weights([v.astype(np.float32) for v in values])


def torch_input_gradient(model, x: np.ndarray, targets) -> np.ndarray:
    """d logit[target_i] / d x_i for each image (NCHW), by torch autograd, float32."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
    logits = model(xt)
    score = logits[torch.arange(len(x)), torch.as_tensor(np.asarray(targets, np.int64))].sum()
    (grad,) = torch.autograd.grad(score, xt)
    return grad.detach().numpy()


@contextlib.contextmanager
def keras_logits(model):
    """The model, yielding pre-softmax scores while inside: the softmax of the last Dense (as keras.applications
    build their heads) is switched off for the duration, or a trailing Activation layer is cut off."""
    import keras

    last = model.layers[-1]
    if isinstance(last, keras.layers.Activation):
        yield keras.Model(model.inputs, model.layers[-2].output)
        return
    saved = getattr(last, "activation", None)
    if saved is None:
        yield model
        return
    last.activation = keras.activations.linear
    try:
        yield model
    finally:
        last.activation = saved


def keras_input_gradient(model, x_nhwc: np.ndarray, targets) -> np.ndarray:
    """d logit[target_i] / d x_i (NHWC) by TensorFlow's GradientTape on the pre-softmax scores."""
    tf = import_tensorflow()

    xv = tf.convert_to_tensor(np.ascontiguousarray(x_nhwc, np.float32))
    idx = tf.stack([tf.range(len(x_nhwc)), tf.constant(np.asarray(targets, np.int32))], axis=1)
    with keras_logits(model) as logits_model, tf.GradientTape() as tape:
        tape.watch(xv)
        score = tf.reduce_sum(tf.gather_nd(logits_model(xv, training=False), idx))
    return tape.gradient(score, xv).numpy()


def relative_max_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref| (inf when the reference is all zeros and ours is not)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    peak = float(np.abs(ref).max())
    diff = float(np.abs(ours - ref).max())
    return diff / peak if peak > 0 else (0.0 if diff == 0 else float("inf"))
