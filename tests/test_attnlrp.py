"""AttnLRP and CP-LRP from the ONNX file against the `lxt` package (Achtibat et al., ICML 2024) on torchvision ViTs.

References, all in LXT's Gradient x Input framework (relevance at the input = x * the modified gradient):
- CP-LRP: LXT's own patch map for torchvision's VisionTransformer (`lxt.efficient.models.vit_torch.cp_LRP`:
  identity on GELU, LayerNorm with its std detached, Q and K detached in nn.MultiheadAttention); ours is
  `--composite cp-lrp`.
- AttnLRP: the same GELU and LayerNorm patches, and nn.MultiheadAttention computed with LXT's uniform rule as LXT
  wraps attention functions (`lxt.efficient.patches.wrap_attention_forward`: query and key gradients / 4, value
  / 2, through LXT's `divide_gradient`), torchvision's MHA having no LXT map of its own; ours is `attnlrp`.
- the gamma rule on the patch-embedding Conv: zennit's Gamma through LXT's zennit patch (`monkey_patch_zennit`);
  ours is `attnlrp` with conv_gamma.
Linear layers without a zennit rule are plain Gradient x Input in LXT (LRP-0); ours use epsilon 1e-6.

lxt 2.1's package `__init__` imports its Hugging Face model patches, which fail on transformers 5.x
(`find_pruneable_heads_and_indices` is gone); the torch-only modules used here are loaded without it.

Models: torchvision's VisionTransformer with ViT-B/16's architecture (224 px, 16 px patches, width 768, 12 heads,
MLP 3072) at depth 2 instead of 12 (the blocks are identical; depth only multiplies export and run time), and a
small DeiT-style model (class and distillation tokens, two heads averaged), random weights, randomised LayerNorm
affines. Bars: Pearson >= 0.999 per image between the input relevances, and their sums within 1%.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from onnx_saliency.parity import install_torchvision_cpu_shim  # noqa: E402

install_torchvision_cpu_shim()
torchvision = pytest.importorskip("torchvision")
lxt = pytest.importorskip("lxt")
zennit = pytest.importorskip("zennit")

from torch import nn  # noqa: E402
from torchvision.models import vision_transformer  # noqa: E402

from onnx_saliency import Explainer, lrp  # noqa: E402
from tests.exports import export_torch  # noqa: E402

pytestmark = pytest.mark.parity
PEARSON = 0.999


def _lxt_module(name: str):
    """An lxt.efficient submodule without running lxt.efficient/__init__ (see the module docstring)."""
    base = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    for pkg, path in (("lxt.efficient", base), ("lxt.efficient.models", os.path.join(base, "models"))):
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = [path]
            sys.modules[pkg] = mod
    return importlib.import_module(name)


def _attnlrp_mha_forward(self, query, key, value, need_weights=False, **kwargs):
    """torchvision's nn.MultiheadAttention (self-attention, batch first, no mask) with LXT's uniform rule applied
    to query, key and value the way LXT wraps attention functions."""
    rules = _lxt_module("lxt.efficient.rules")
    n, t, c = query.shape
    h = self.num_heads
    qkv = nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias)
    q, k, v = (z.reshape(n, t, h, c // h).transpose(1, 2) for z in qkv.chunk(3, -1))
    q, k, v = rules.divide_gradient(q, 4), rules.divide_gradient(k, 4), rules.divide_gradient(v, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / (c // h) ** 0.5, -1)
    return self.out_proj((a @ v).transpose(1, 2).reshape(n, t, c)), None


@contextlib.contextmanager
def lxt_patched(variant: str):
    """LXT's patches on the torch classes (they patch classes, globally): restored on exit."""
    patches = _lxt_module("lxt.efficient.patches")
    vit_torch = _lxt_module("lxt.efficient.models.vit_torch")
    classes = (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)
    saved = {cls: cls.forward for cls in classes}
    try:
        if variant == "cp-lrp":
            for target, patch in vit_torch.cp_LRP.items():
                assert patch(target), target
        else:
            assert patches.patch_method(patches.non_linear_forward, nn.GELU, keep_original=True)
            assert patches.patch_method(patches.layer_norm_forward, nn.LayerNorm)
            assert patches.patch_method(_attnlrp_mha_forward, nn.MultiheadAttention)
        yield
    finally:
        for cls, forward in saved.items():
            cls.forward = forward
            if "original_forward" in cls.__dict__:
                del cls.original_forward


@contextlib.contextmanager
def zennit_conv_gamma(model, gamma: float):
    """zennit's Gamma on every Conv2d through LXT's Gradient x Input patch of zennit's BasicHook (restored)."""
    from zennit.composites import LayerMapComposite
    from zennit.core import BasicHook
    from zennit.rules import Gamma

    zp = _lxt_module("lxt.efficient.zennit_patches")
    saved = {"forward": BasicHook.forward, "backward": BasicHook.backward}
    zp.monkey_patch_zennit()
    composite = LayerMapComposite([(nn.Conv2d, Gamma(gamma))])
    try:
        with composite.context(model):
            yield
    finally:
        for name, fn in saved.items():
            setattr(BasicHook, name, fn)


def lxt_relevance(model, x, targets, variant, conv_gamma=0.0):
    xt = torch.from_numpy(x).requires_grad_(True)
    with lxt_patched(variant), (zennit_conv_gamma(model, conv_gamma) if conv_gamma else contextlib.nullcontext()):
        y = model(xt)
        y[torch.arange(len(x)), torch.as_tensor(targets)].sum().backward()
    return (xt * xt.grad).detach().numpy()


def _randomise_norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.weight.data = 0.5 + torch.rand(mod.weight.shape, generator=g)
            mod.bias.data = 0.2 * torch.randn(mod.bias.shape, generator=g)


class DeiTStyle(vision_transformer.VisionTransformer):
    """DeiT's distilled layout on torchvision's blocks: class and distillation tokens, one head on each, averaged."""

    def __init__(self, **kw):
        super().__init__(**kw)
        hidden = kw["hidden_dim"]
        self.dist_token = nn.Parameter(0.5 * torch.randn(1, 1, hidden))
        self.head_dist = nn.Linear(hidden, kw["num_classes"])
        self.encoder.pos_embedding = nn.Parameter(0.02 * torch.randn(1, self.seq_length + 1, hidden))

    def forward(self, x):
        x = self._process_input(x)
        n = x.shape[0]
        x = torch.cat([self.class_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), x], dim=1)
        x = self.encoder(x)
        return (self.heads(x[:, 0]) + self.head_dist(x[:, 1])) / 2


def vit_b16_depth2():
    m = vision_transformer.VisionTransformer(image_size=224, patch_size=16, num_layers=2, num_heads=12,
                                             hidden_dim=768, mlp_dim=3072, num_classes=1000)
    nn.init.normal_(m.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    nn.init.normal_(m.class_token, std=0.5)
    return m, 224


def deit_small():
    m = DeiTStyle(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.2)
    nn.init.normal_(m.class_token, std=0.5)
    return m, 32


MODELS = {"vit_b16_depth2": vit_b16_depth2, "deit_small": deit_small}


class Bundle:
    def __init__(self, model, x, path):
        self.model, self.x, self.path = model, x, path
        self.ex = Explainer(path)
        with torch.no_grad():
            logits = model(torch.from_numpy(x)).numpy()
        self.targets = [int(logits[0].argmax()), int(np.argsort(logits[1])[-3])]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            torch.manual_seed(0)
            model, size = MODELS[name]()
            _randomise_norms(model, 1)
            model.eval()
            rng = np.random.default_rng(0)
            x = (0.7 * rng.uniform(-1, 1, (2, 3, size // 8, size // 8)).repeat(8, 2).repeat(8, 3)
                 + 0.3 * rng.standard_normal((2, 3, size, size))).astype(np.float32)
            path = export_torch(model, tmp_path_factory.mktemp("attnlrp") / f"{name}_{exporter}.onnx", size, exporter)
            cache[(name, exporter)] = Bundle(model, x, path)
        return cache[(name, exporter)]
    return get


def _check(ours, ref, what):
    p = [float(np.corrcoef(o.ravel(), r.ravel())[0, 1]) for o, r in zip(ours, ref)]
    sums = ours.reshape(len(ours), -1).sum(1), ref.reshape(len(ref), -1).sum(1)
    assert all(np.abs(r).max() > 0 for r in ref), f"{what}: a zero reference proves nothing"
    assert min(p) >= PEARSON, f"{what}: Pearson per image {p}"
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-2, err_msg=what)


CASES = [("deit_small", "legacy", "cp-lrp"), ("deit_small", "legacy", "attnlrp"),
         ("deit_small", "dynamo", "cp-lrp"), ("deit_small", "dynamo", "attnlrp"),
         pytest.param("vit_b16_depth2", "legacy", "cp-lrp", marks=pytest.mark.slow),
         pytest.param("vit_b16_depth2", "legacy", "attnlrp", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,exporter,variant", CASES)
def test_matches_lxt(exported, name, exporter, variant):
    b = exported(name, exporter)
    ref = lxt_relevance(b.model, b.x, b.targets, variant)
    r = b.ex.explain(b.x, method="lrp", composite=variant, target=b.targets)
    assert r.targets.tolist() == b.targets
    _check(r.attributions, ref, f"{name} {exporter} {variant}")


def test_conv_gamma_matches_lxt_with_zennit(exported):
    b = exported("deit_small", "legacy")
    ref = lxt_relevance(b.model, b.x, b.targets, "attnlrp", conv_gamma=0.25)
    r = b.ex.explain(b.x, method="lrp", composite="attnlrp", conv_gamma=0.25, target=b.targets)
    _check(r.attributions, ref, "attnlrp conv_gamma=0.25")
    direct = lrp.relevance_at(b.ex.engine, b.x, b.targets, composite=lrp.get_composite("attnlrp", conv_gamma=0.25))
    np.testing.assert_allclose(direct["relevance"][b.ex.model.input_name], r.attributions, rtol=1e-5, atol=1e-7)
    plain = b.ex.explain(b.x, method="lrp", composite="attnlrp", target=b.targets).attributions
    assert not np.allclose(plain, r.attributions), "gamma must change the map"
    from onnx_saliency.errors import SaliencyError

    with pytest.raises(SaliencyError, match="only the attnlrp and cp-lrp composites take a layer gamma"):
        b.ex.explain(b.x, method="lrp", composite="epsilon-plus-flat", conv_gamma=0.25)


def test_cp_lrp_and_attnlrp_differ_and_lxt_patches_are_undone(exported):
    b = exported("deit_small", "legacy")
    cp = b.ex.explain(b.x, method="lrp", composite="cp-lrp", target=b.targets).attributions
    attn = b.ex.explain(b.x, method="lrp", composite="attnlrp", target=b.targets).attributions
    assert min(np.corrcoef(c.ravel(), a.ravel())[0, 1] for c, a in zip(cp, attn)) < 0.9999
    assert "original_forward" not in nn.MultiheadAttention.__dict__ and nn.LayerNorm.forward.__module__.startswith("torch")


@pytest.mark.parametrize("variant", ["cp-lrp", "attnlrp"])
def test_embedding_absorption_matches_lxt(exported, variant):
    """What the class + distillation tokens and the position embedding absorb equals, in LXT's Gradient x Input
    framework, parameter x its gradient summed (the relevance LXT leaves on those parameters)."""
    from onnx_saliency.lrp.blocks import conservation, token_stream

    b = exported("deit_small", "legacy")
    m = b.model
    xt = torch.from_numpy(b.x).requires_grad_(True)
    m.zero_grad()
    with lxt_patched(variant):
        y = m(xt)
        picked = y[torch.arange(len(b.x)), torch.as_tensor(b.targets)]
        picked.sum().backward()
    start = picked.detach().numpy().astype(np.float64)
    # one batch, so the parameters' gradients are summed over both images: compare the batch totals
    with torch.no_grad():
        prefix_ref = float((m.class_token * m.class_token.grad).sum() + (m.dist_token * m.dist_token.grad).sum())
        pos_ref = float((m.encoder.pos_embedding * m.encoder.pos_embedding.grad).sum())
    ts = token_stream(b.ex.model.canonical, b.ex.model.score_tensor)
    assert ts is not None and ts.tokens and ts.patches and ts.embedded and len(ts.stream) == 4
    out = lrp.relevance_at(b.ex.engine, b.x, b.targets, composite=variant, at=[b.ex.model.input_name] + ts.tensors())
    c = conservation(ts, out["relevance"], out["start"])
    np.testing.assert_allclose(out["start"], start, rtol=1e-5)
    assert abs(prefix_ref) > 1e-3 * start.sum() and abs(pos_ref) > 1e-3 * start.sum(), (prefix_ref, pos_ref)
    np.testing.assert_allclose((c["prefix"] * start).sum(), prefix_ref, rtol=1e-2)
    np.testing.assert_allclose((c["position"] * start).sum(), pos_ref, rtol=1e-2)
    assert c["blocks"].shape == (2, 2) and np.isfinite(c["blocks"]).all()
    notes = b.ex.explain(b.x, method="lrp", composite=variant, target=b.targets).notes
    assert any(n.startswith("block 1: R(in) / R(out) = ") for n in notes)
    assert any(n.startswith("prefix tokens (class/distillation) absorb ") for n in notes)


def test_rules_command_prints_block_conservation(exported, tmp_path):
    import cv2
    from click.testing import CliRunner

    from cli.main import main

    b = exported("deit_small", "dynamo")
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), (np.random.default_rng(1).uniform(0, 255, (40, 48, 3))).astype(np.uint8))
    res = CliRunner().invoke(main, ["rules", str(b.path), "--composite", "attnlrp", "--image", str(img)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "nodes without a rule: none" in lines
    assert any(line.startswith("block 1: R(in) / R(out) = ") for line in lines)
    assert any(line.startswith("position embedding absorbs ") for line in lines)
    bad = CliRunner().invoke(main, ["rules", str(b.path), "--image", str(tmp_path / "missing.png")])
    assert bad.exit_code != 0 and bad.output.count("\n") <= 1 and "error:" in bad.output
