"""A CI slice of the coverage matrix (benchmarks/coverage.py runs the full one; results in docs/coverage.md).

One tiny-width model per op family, built from torchvision's own classes (the same blocks as the zoo, a few
channels wide, 32 px inputs, 56 for VGG's 7x7 pooled head), exported with both torch exporters, plus one Keras
application through tf2onnx. Each is explained with gradient (against torch autograd / TensorFlow's
GradientTape), Grad-CAM and LRP.

Families and the ops they bring (legacy | dynamo exporter):
- resnet: Conv, residual Add, MaxPool, GlobalAveragePool | ReduceMean, Gemm
- densenet: Concat, BatchNormalization after a Concat (kept, not foldable), AveragePool
- mobilenet_v3: depthwise Conv, HardSwish, HardSigmoid, squeeze-excitation Mul
- efficientnet: SiLU as Sigmoid * x, squeeze-excitation, stochastic depth (identity in eval)
- regnet: grouped Conv, squeeze-excitation with ReLU
- squeezenet: Fire modules (Concat), a Conv classifier (no Gemm)
- vgg: MaxPool stacks, Flatten + Linear-ReLU-Dropout head
- convnext: LayerNormalization, Gelu | Erf, channels-last Linear (Transpose + MatMul), layer scale
- shufflenet: channel shuffle (Reshape, Transpose), Split | Gather + Slice of channel halves
- keras MobileNetV2: NHWC input + Transpose, Clip (ReLU6), depthwise Conv, BatchNorm as Mul + Add, MatMul head
- vit: patch Conv, class token Concat, attention (MatMul of activations, Softmax), LayerNormalization, Gelu

Models whose ops main cannot differentiate yet are xfail(strict=True, raises=(UnsupportedModelError, GraphPassError)) with the
missing ops in the reason: they must fail only by being refused at load, and the marker must go as soon as
the ops are supported (a strict xfail that passes fails the suite).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from onnx_saliency.parity import install_torchvision_cpu_shim  # noqa: E402
from tests.torch_shim import randomise_bn  # noqa: E402

install_torchvision_cpu_shim()
torchvision = pytest.importorskip("torchvision")

from onnx_saliency import Explainer  # noqa: E402
from graph_passes import GraphPassError  # noqa: E402
from onnx_saliency.errors import UnsupportedModelError  # noqa: E402
from tests.exports import (export_keras, export_torch, keras_input_gradient, randomise_keras_bn,  # noqa: E402
                           relative_max_error, torch_input_gradient)

pytestmark = pytest.mark.parity

CLASSES = 10
# float32 input gradients of ReLU/max-pool nets are not continuous in the rounding (see test_parity_torch):
# the bars leave room for a kink taken the other way, and are orders of magnitude below a wrong rule's error
MAX_REL = 1e-2
REL_L2 = 1e-3


def _resnet():
    from torchvision.models import resnet

    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)


def _densenet():
    from torchvision.models import densenet

    return densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                             num_classes=CLASSES)


def _mobilenet_v3():
    from torchvision.models import mobilenetv3

    setting, last = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    return mobilenetv3.MobileNetV3(setting[:4], last, num_classes=CLASSES)


def _efficientnet():
    from torchvision.models import efficientnet

    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return efficientnet.EfficientNet(setting[:4], 0.2, last_channel=last, num_classes=CLASSES)


def _regnet():
    from torchvision.models import regnet

    params = regnet.BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=4, se_ratio=0.25)
    return regnet.RegNet(params, num_classes=CLASSES, stem_width=8)


def _squeezenet():
    from torchvision.models import squeezenet

    return squeezenet.SqueezeNet("1_1", num_classes=CLASSES)


def _vgg():
    from torchvision.models import vgg

    nn = torch.nn
    m = vgg.VGG(vgg.make_layers([8, "M", 16, "M", 16, "M"], batch_norm=True), num_classes=CLASSES)
    m.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, CLASSES))
    return m


def _convnext():
    from torchvision.models import convnext

    return convnext.ConvNeXt([convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)],
                             num_classes=CLASSES)


def _shufflenet():
    from torchvision.models import shufflenetv2

    return shufflenetv2.ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 128], num_classes=CLASSES)


def _vit():
    from torchvision.models import vision_transformer

    m = vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                             hidden_dim=16, mlp_dim=32, num_classes=CLASSES)
    torch.nn.init.normal_(m.heads.head.weight, std=0.2)  # torchvision zero-initialises the head: no gradient
    return m


# family -> (builder, input size, {exporter: the ops main refuses, or absent when it explains the export})
FAMILIES = {
    "resnet": (_resnet, 32, {}),
    "densenet": (_densenet, 32, {}),
    "mobilenet_v3": (_mobilenet_v3, 32, {}),
    "efficientnet": (_efficientnet, 32, {}),
    "regnet": (_regnet, 32, {}),
    "squeezenet": (_squeezenet, 32, {}),
    "vgg": (_vgg, 56, {}),
    "convnext": (_convnext, 32, {}),
    "shufflenet": (_shufflenet, 32, {}),
    "vit": (_vit, 32, {}),
}


def _cases():
    for family, (_, _, missing) in FAMILIES.items():
        for exporter in ("legacy", "dynamo"):
            marks = ()
            if exporter in missing:
                marks = pytest.mark.xfail(strict=True, raises=(UnsupportedModelError, GraphPassError),
                                          reason=f"main cannot explain {missing[exporter]} yet (issue 14)")
            yield pytest.param(family, exporter, marks=marks, id=f"{family}-{exporter}")


def _inputs(size: int, seed: int = 0) -> np.ndarray:
    """Two smooth, image-like NCHW inputs, ImageNet-normalised."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (2, 3, size // 4, size // 4)).repeat(4, axis=2).repeat(4, axis=3)
    img = 0.7 * base + 0.3 * rng.uniform(0, 1, (2, 3, size, size))
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((img - mean) / std).astype(np.float32)


def _check_maps(ex, xin, targets, size):
    for method in ("gradcam", "lrp"):
        r = ex.explain(xin, method=method, target=targets)
        assert r.maps.shape == (2, size, size) and np.isfinite(r.maps).all(), method
        assert (r.targets == np.asarray(targets)).all(), method
        assert all(np.ptp(m) > 0 for m in r.maps), f"{method}: a constant map"


@pytest.mark.parametrize("family,exporter", list(_cases()))
def test_torch_export_is_explained_with_autograd_gradients(family, exporter, tmp_path):
    builder, size, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = builder()
    randomise_bn(model, 1)
    model.eval()
    path = export_torch(model, tmp_path / f"{family}.onnx", size, exporter)
    ex = Explainer(path)
    x = _inputs(size)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    assert relative_max_error(ex.predict(x), logits) < 1e-4
    targets = [int(logits[0].argmax()), int(np.argsort(logits[1])[-3])]  # a top-1 and a third-best class
    ours = ex.explain(x, method="gradient", target=targets).attributions
    ref = torch_input_gradient(model, x, targets)
    assert (np.abs(ref).max(axis=(1, 2, 3)) > 0).all(), "a zero reference gradient proves nothing"
    l2 = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert relative_max_error(ours, ref) < MAX_REL and l2 < REL_L2, (relative_max_error(ours, ref), l2)
    _check_maps(ex, x, targets, size)


def test_keras_application_export_is_explained_with_gradienttape_gradients(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import keras

    keras.utils.set_random_seed(0)
    size = 32
    # MobileNetV3Small would bring HardSwish, but tf2onnx 1.17 fails on its Rescaling layer (transpose optimizer,
    # "max() arg is an empty sequence"; docs/coverage.md has the whole Keras list)
    model = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, weights=None, classes=CLASSES)
    randomise_keras_bn(model, 1)
    path = export_keras(model, tmp_path / "mobilenet_v2.onnx", preset="tf")
    ex = Explainer(path)
    assert ex.model.layout == "NHWC"
    x = _inputs(size).transpose(0, 2, 3, 1).copy()
    from tests.exports import keras_logits

    with keras_logits(model) as logits_model:
        logits = logits_model(x, training=False).numpy()
    assert relative_max_error(ex.predict(x), logits) < 1e-4
    targets = [int(logits[0].argmax()), int(np.argsort(logits[1])[-3])]
    ours = ex.explain(x, method="gradient", target=targets).attributions.transpose(0, 2, 3, 1)
    ref = keras_input_gradient(model, x, targets)
    assert (np.abs(ref).max(axis=(1, 2, 3)) > 0).all()
    l2 = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert relative_max_error(ours, ref) < MAX_REL and l2 < REL_L2, (relative_max_error(ours, ref), l2)
    _check_maps(ex, x, targets, size)
