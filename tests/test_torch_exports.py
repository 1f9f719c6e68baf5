"""torchvision's ConvNeXt, ShuffleNetV2 and Swin, exported with both torch exporters, explained from the file.

ConvNeXt (LayerNormalization, GELU as Erf or as Gelu) and ShuffleNetV2 (Split or Slice, the channel shuffle)
were refused at load before their ops had rules; Swin-T's legacy export listed 835 unsupported nodes, 676 of
them input-independent mask arithmetic. Models are the torchvision classes themselves at small widths (the ops
are what is tested, and full-size dynamo exports take ~15 s each on two cores), seeded random weights with
randomised norm statistics, affine parameters and ConvNeXt's layer scale (at its 1e-6 init every block would be
nearly the identity); Swin is torchvision's SwinTransformer (swin_t's code) at embed_dim 16 with two stages on
32x32 images (swin_t itself at 64x64 takes ~50 s per exporter to export and load here). Each model is exported
once per module.

Checks: the input gradient of the top-1 score equals torch autograd (max |diff| <= 1e-4 max |grad|; observed
~1e-6); LRP runs, and every node whose rule is not a linear layer's (pass, routing, winner-take-all, gates,
residual sums) hands on exactly the relevance it gets (per-node conservation table; only biases and epsilon in
the linear layers absorb); Swin-T loads with its mask arithmetic folded away.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tests.torch_shim import install_torchvision_cpu_shim, randomise_bn  # noqa: E402

install_torchvision_cpu_shim()
torchvision = pytest.importorskip("torchvision")

from onnx_saliency import Explainer, lrp  # noqa: E402

pytestmark = pytest.mark.parity

EXPORTERS = ["legacy", "dynamo"]


def _randomise_norms(model, seed: int) -> None:
    randomise_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
            mod.weight.data = 0.5 + torch.rand(mod.weight.shape, generator=g)
            mod.bias.data = 0.2 * torch.randn(mod.bias.shape, generator=g)
        if hasattr(mod, "layer_scale"):
            mod.layer_scale.data = 0.3 + 0.7 * torch.rand(mod.layer_scale.shape, generator=g)


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10), 32


def _shufflenet():
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    return ShuffleNetV2([2, 2, 1], [8, 16, 32, 48, 64], num_classes=10), 64


def _swin():
    from torchvision.models.swin_transformer import SwinTransformer

    # swin_t's code at a small size: 8x8 tokens in 4x4 windows, so the shifted blocks build their masks
    return SwinTransformer([4, 4], 16, [2, 2], [1, 2], [4, 4], stochastic_depth_prob=0.0, num_classes=10), 32


BUILDERS = {"convnext": _convnext, "shufflenet": _shufflenet, "swin_t": _swin}


class Exported:
    def __init__(self, model, x, path):
        self.model, self.x, self.path = model, x, path
        self.ex = Explainer(path, preset="torchvision", threads=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict = {}

    def get(name: str, exporter: str) -> Exported:
        if (name, exporter) not in cache:
            torch.manual_seed(0)
            model, size = BUILDERS[name]()
            model.eval()
            _randomise_norms(model, 3)
            x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
            path = tmp_path_factory.mktemp("exports") / f"{name}_{exporter}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "legacy":
                    torch.onnx.export(model, (torch.from_numpy(x),), str(path), opset_version=17, dynamo=False,
                                      input_names=["input"], output_names=["logits"])
                else:
                    torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=True,
                                      input_names=["input"], output_names=["logits"])
            cache[(name, exporter)] = Exported(model, x, path)
        return cache[(name, exporter)]
    return get


def _autograd(e: Exported):
    xt = torch.from_numpy(e.x).requires_grad_(True)
    out = e.model(xt)
    targets = out.argmax(1)
    out[torch.arange(len(targets)), targets].sum().backward()
    return xt.grad.numpy(), targets.numpy()


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["convnext", "shufflenet", "swin_t"])
def test_input_gradient_equals_autograd(exported, name, exporter):
    e = exported(name, exporter)
    ref, targets = _autograd(e)
    got = e.ex.explain(e.x, method="gradient", target=targets).attributions
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (np.abs(got - ref).max(), np.abs(ref).max())


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["convnext", "shufflenet"])
def test_lrp_runs_and_every_non_layer_node_conserves(exported, name, exporter):
    e = exported(name, exporter)
    rows = lrp.conservation_table(e.ex.engine, e.x, composite="epsilon-plus-flat")
    checked = 0
    for row in rows:
        if row["rule"].startswith(("pass", "gradient", "wta", "gate", "norm")):
            scale = max(np.abs(row["out"]).max(), 1e-12)
            assert np.abs(row["in"] - row["out"]).max() <= 1e-4 * scale, row
            checked += 1
    assert checked > 10
    first = rows[0]
    assert np.isfinite(first["in"]).all()


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_swin_loads_with_its_mask_arithmetic_folded(exported, exporter):
    """The shifted-window masks are computed from shapes only: after canonicalisation nothing of them is left
    (no Mod, ScatterND, Range, Expand or Where), and AttnLRP runs through its windowed attention."""
    e = exported("swin_t", exporter)
    ops = {n.op_type for n in e.ex.model.canonical.graph.node}
    assert not ops & {"Mod", "ScatterND", "Range", "ConstantOfShape", "Expand", "Where", "Shape"}, ops
    rows = lrp.conservation_table(e.ex.engine, e.x, composite="attnlrp")
    products = [r for r in rows if r["rule"].startswith("uniform")]
    assert len(products) == 8  # Q K^T and A V in each of the four blocks: half to each operand, conserved
    total = np.abs(rows[-1]["out"]).max()  # the head's relevance: the explained score
    for r in products:  # the epsilon stabiliser (1e-6) on products whose relevance is ~1e-8 of the score's
        assert np.abs(r["in"] - r["out"]).max() <= 1e-4 * np.abs(r["out"]).max() + 1e-6 * total, r
    assert np.isfinite(rows[0]["in"]).all()


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_float16_export_explains_like_float32(exported, tmp_path, exporter):
    """torch .half() export (float16 input, weights and output): loaded, computed in float32, and its gradient
    is the float32 network's on the float16-rounded weights; the maps match the float32 export's within what
    that rounding moves them."""
    import copy

    e = exported("convnext", exporter)
    half = copy.deepcopy(e.model).half()
    path = tmp_path / f"convnext_{exporter}_fp16.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(half, (torch.from_numpy(e.x).half(),), str(path), opset_version=17 if exporter == "legacy"
                          else None, dynamo=exporter == "dynamo", input_names=["input"], output_names=["logits"])
    ex16 = Explainer(path, preset="torchvision", threads=2)
    assert any(line.startswith("float16 computed in float32") for line in ex16.model.report.lines())
    rounded = copy.deepcopy(half).float()  # float32 arithmetic on the rounded weights
    ref, targets = _autograd(_with(e, rounded))
    got = ex16.explain(e.x, method="gradient", target=targets).attributions
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    full = e.ex.explain(e.x, method="gradient", target=targets).attributions
    for a, b in zip(got, full):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    cam16 = ex16.explain(e.x, method="gradcam", target=targets).maps
    cam32 = e.ex.explain(e.x, method="gradcam", target=targets).maps
    assert np.abs(cam16 - cam32).max() <= 2e-2


def _with(e: Exported, model) -> Exported:
    other = Exported.__new__(Exported)
    other.model, other.x, other.path = model, e.x, e.path
    return other
