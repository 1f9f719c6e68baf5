"""Parity of onnx-saliency LRP with zennit 0.5 on torchvision models (seeded random weights, exported here).

Conventions aligned on both sides (what makes the numbers comparable):
- stabiliser: z + 1e-6 * sign(z), sign(0) = +1, for every rule (zennit's default; ours is the same function);
- initial relevance: one-hot x logit of the target class (zennit: attr_output = onehot * output; ours init="logit");
- canonizers: zennit merges BatchNorm into the preceding conv (ResNetCanonizer / VGGCanonizer, which
  also turns the residual add into a Sum module under the Norm rule); torch.onnx.export folds the same BN, and
  our residual Add gets Norm. AdaptiveAvgPool (GlobalAveragePool / AveragePool in ONNX) -> Norm; ReLU -> Pass;
  MaxPool -> gradient (winner-take-all); flatten -> reshape; dense layers -> epsilon 1e-6;
- first layer: zennit's first Linear/Conv module = our first Conv reached from the input;
- z^B bounds: ImageNet (0 - mean) / std and (1 - mean) / std per channel on both sides.
BatchNorm statistics are randomised so folding is not a no-op. The bar: Pearson >= 0.999 and
max |R_onnx - R_zennit| <= 1e-3 * max |R_zennit| on the input relevance.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tests.torch_shim import install_torchvision_cpu_shim  # noqa: E402

install_torchvision_cpu_shim()  # before zennit, which imports torchvision
pytest.importorskip("zennit")

pytestmark = pytest.mark.parity

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD
SIZES = {"resnet18": 112, "vgg11": 112, "densenet121": 64}  # small inputs keep the file fast on 2 cores


def _tv():
    from tests.torch_shim import install_torchvision_cpu_shim

    install_torchvision_cpu_shim()
    import torchvision

    return torchvision


def _randomise_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.weight.data = 0.5 + torch.rand(n, generator=g)
            mod.bias.data = 0.2 * torch.randn(n, generator=g)
            mod.running_mean = 0.2 * torch.randn(n, generator=g)
            mod.running_var = 0.5 + torch.rand(n, generator=g)


def _build(name, tmp_path):
    tv = _tv()
    torch.manual_seed(0)
    model = {"resnet18": tv.models.resnet18, "vgg11": tv.models.vgg11, "densenet121": tv.models.densenet121}[name]()
    if name == "vgg11":
        # VGG-11's features unchanged; the head shrunk to fit 112 px inputs and keep the 500 MB classifier out of
        # the test (same op types: AdaptiveAvgPool -> Linear/ReLU/Dropout x2 -> Linear)
        model.avgpool = torch.nn.AdaptiveAvgPool2d((3, 3))
        model.classifier = torch.nn.Sequential(
            torch.nn.Linear(512 * 9, 512), torch.nn.ReLU(True), torch.nn.Dropout(),
            torch.nn.Linear(512, 512), torch.nn.ReLU(True), torch.nn.Dropout(), torch.nn.Linear(512, 1000))
    _randomise_bn(model, 1)
    model.eval()
    x = _images(2, SIZES[name])
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return model, path, x


def _images(n, size):
    rng = np.random.default_rng(3)
    # smooth image-like inputs inside the box, normalised
    base = rng.uniform(0, 1, (n, 3, size // 8, size // 8)).astype(np.float32)
    img = base.repeat(8, axis=2).repeat(8, axis=3) * 0.7 + 0.3 * rng.uniform(0, 1, (n, 3, size, size))
    return ((img - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


def _zennit(model, name, composite_name, x, targets):
    torch.set_num_threads(2)
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canon = {"resnet18": ResNetCanonizer, "vgg11": VGGCanonizer, "densenet121": SequentialMergeBatchNorm}[name]()
    if composite_name == "epsilon-plus-flat":
        comp = EpsilonPlusFlat(canonizers=[canon])
    elif composite_name == "epsilon-gamma-box":
        comp = EpsilonGammaBox(low=torch.from_numpy(LOW).view(1, 3, 1, 1), high=torch.from_numpy(HIGH).view(1, 3, 1, 1),
                               canonizers=[canon])
    else:
        comp = EpsilonAlpha2Beta1(canonizers=[canon])
    xt = torch.from_numpy(x).requires_grad_(True)
    onehot = torch.eye(1000)[torch.from_numpy(targets)]
    t0 = time.perf_counter()
    with Gradient(model=model, composite=comp) as attributor:
        _, rel = attributor(xt, lambda out: onehot * out)
    return rel.detach().numpy().astype(np.float64), time.perf_counter() - t0


def _ours(path, composite_name, x, targets):
    from onnx_saliency import lrp
    from onnx_saliency.engine import Engine
    from onnx_saliency.model import load_model

    m = load_model(path)
    engine = Engine(m, threads=2)
    comp = lrp.get_composite(composite_name, low=LOW, high=HIGH)
    out = lrp.relevance_at(engine, x, targets, composite=comp)  # builds + warms the session
    t0 = time.perf_counter()
    out = lrp.relevance_at(engine, x, targets, composite=comp)
    return out["relevance"][m.input_name].astype(np.float64), time.perf_counter() - t0, out


def _compare(a, b):
    pearson = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    rel_max = float(np.abs(a - b).max() / np.abs(b).max())
    return pearson, rel_max


COMPOSITES = ["epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"]
RESULTS: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _build(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
@pytest.mark.parametrize("composite", COMPOSITES)
def test_zennit_parity(exported, name, composite):
    model, path, x = exported(name)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    targets = logits.argmax(1).astype(np.int64)
    ours, t_ours, out = _ours(path, composite, x, targets)
    ref, t_ref = _zennit(model, name, composite, x, targets)
    np.testing.assert_array_equal(out["targets"], targets)
    pearson, rel_max = _compare(ours, ref)
    RESULTS[(name, composite)] = (pearson, rel_max, t_ours, t_ref)
    print(f"{name} {composite}: pearson {pearson:.6f} max|d|/max|R| {rel_max:.2e} ours {t_ours*1e3:.0f} ms "
          f"zennit {t_ref*1e3:.0f} ms")
    assert pearson >= 0.999
    assert rel_max <= 1e-3
