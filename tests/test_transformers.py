"""Vision transformers explained from their ONNX file: the CAM family on token maps, attention rollout.

Models are torchvision's own VisionTransformer and SwinTransformer classes at small widths (the ops and the token
layouts are what is tested), random weights with randomised LayerNorm affines, 32x32 inputs: ViT with 4x4
patches (1 class token + an 8x8 grid, 2 blocks), Swin with 4x4 patches and two stages (8x8 then 4x4 tokens, 4x4
windows, so the second block of each stage is shifted). Both torch exporters.

CAMs: `--layer auto` must pick the last block's norm1 (pytorch-grad-cam's documented target layer for ViT and
Swin: it is the tensor a forward hook on `encoder.layers[-1].ln_1` / `features[-1][-1].norm1` sees), and the maps
equal pytorch-grad-cam's with its documented reshape_transform (ViT: drop the class token, (N, 64, C) ->
(N, C, 8, 8); Swin: (N, h, w, C) -> (N, C, h, w)): Pearson >= 0.9999 per image, max |diff| <= 2e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from onnx_saliency.parity import install_torchvision_cpu_shim  # noqa: E402

install_torchvision_cpu_shim()
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")

from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from onnx_saliency import Explainer  # noqa: E402
from onnx_saliency.intake.layers import auto_layer, candidate_layers, spatial_view  # noqa: E402
from tests.exports import export_torch  # noqa: E402

pytestmark = pytest.mark.parity

SIZE, CLASSES = 32, 10
CAM_PEARSON, CAM_MAX_ABS = 0.9999, 2e-3
PGC = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}


def _randomise_norms(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
            mod.weight.data = 0.5 + torch.rand(mod.weight.shape, generator=g)
            mod.bias.data = 0.2 * torch.randn(mod.bias.shape, generator=g)


def vit():
    from torchvision.models import vision_transformer

    m = vision_transformer.VisionTransformer(image_size=SIZE, patch_size=4, num_layers=2, num_heads=2,
                                             hidden_dim=16, mlp_dim=32, num_classes=CLASSES)
    torch.nn.init.normal_(m.heads.head.weight, std=0.2)  # torchvision zero-initialises the head: no gradient
    torch.nn.init.normal_(m.class_token, std=0.5)
    return m


def swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [2, 2], [1, 2], [4, 4], stochastic_depth_prob=0.0, num_classes=CLASSES)


def vit_norm1(m):
    return m.encoder.layers[-1].ln_1


def swin_norm1(m):
    return m.features[-1][-1].norm1


def vit_reshape(t, h=SIZE // 4, w=SIZE // 4):
    """pytorch-grad-cam's documented ViT reshape_transform (tutorials/vision_transformers): drop the class
    token, tokens to a grid, channels first."""
    result = t[:, 1:, :].reshape(t.size(0), h, w, t.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(t):
    """torchvision's Swin keeps (N, h, w, C): channels first."""
    return t.permute(0, 3, 1, 2)


MODELS = {"vit": (vit, vit_norm1, vit_reshape), "swin": (swin, swin_norm1, swin_reshape)}
EXPORTERS = ("legacy", "dynamo")


def images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 3, SIZE // 8, SIZE // 8)).repeat(8, axis=2).repeat(8, axis=3)
    img = 0.7 * base + 0.3 * rng.uniform(0, 1, (n, 3, SIZE, SIZE))
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((img - mean) / std).astype(np.float32)


class Bundle:
    def __init__(self, name, model, path):
        self.name, self.model, self.path = name, model, path
        self.ex = Explainer(path)
        self.x = images()
        with torch.no_grad():
            self.logits = model(torch.from_numpy(self.x)).numpy()
        self.targets = [int(self.logits[0].argmax()), int(np.argsort(self.logits[1])[-3])]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name, exporter) -> Bundle:
        if (name, exporter) not in cache:
            torch.manual_seed(0)
            model = MODELS[name][0]()
            _randomise_norms(model, 1)
            model.eval()
            path = export_torch(model, tmp_path_factory.mktemp("tx") / f"{name}_{exporter}.onnx", SIZE, exporter)
            cache[(name, exporter)] = Bundle(name, model, path)
        return cache[(name, exporter)]
    return get


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


CASES = [(n, e) for n in MODELS for e in EXPORTERS]


@pytest.mark.parametrize("name,exporter", CASES)
def test_auto_layer_is_the_last_blocks_norm1(exported, name, exporter):
    b = exported(name, exporter)
    module = MODELS[name][1](b.model)
    seen = {}
    hook = module.register_forward_hook(lambda mod, inp, out: seen.__setitem__("a", out.detach().numpy()))
    with torch.no_grad():
        b.model(torch.from_numpy(b.x))
    hook.remove()
    layer = auto_layer(b.ex.model)
    got = b.ex.engine.run(b.x, expose=[layer])[layer]
    assert got.shape == seen["a"].shape and np.abs(got - seen["a"]).max() <= 1e-4 * np.abs(seen["a"]).max()
    view = spatial_view(b.ex.model, layer)
    assert (view.layout, view.prefix, view.grid) == (("NTC", 1, (8, 8)) if name == "vit" else ("NHWC", 0, ()))
    assert layer in [la.tensor for la in candidate_layers(b.ex.model)]


@pytest.mark.parametrize("method", list(PGC))
@pytest.mark.parametrize("name,exporter", CASES)
def test_cams_on_token_maps_match_pytorch_grad_cam(exported, name, exporter, method):
    b = exported(name, exporter)
    _, norm1, reshape = MODELS[name]
    cam = PGC[method](model=b.model, target_layers=[norm1(b.model)], reshape_transform=reshape)
    try:
        ref = cam(input_tensor=torch.from_numpy(b.x), targets=[ClassifierOutputTarget(t) for t in b.targets])
    finally:
        cam.activations_and_grads.release()
    r = b.ex.explain(b.x, method=method, layer="auto", target=b.targets)
    assert r.maps.shape == ref.shape and all(m.std() > 0 for m in ref)
    p, d = [_pearson(o, q) for o, q in zip(r.maps, ref)], float(np.abs(r.maps - ref).max())
    assert min(p) >= CAM_PEARSON and d <= CAM_MAX_ABS, (p, d)


# --- attention rollout ---------------------------------------------------------------------------------------
# Our own torch references, written from the papers: Abnar & Zuidema 2020 (rollout: (A + I) / 2, rows
# renormalised, product over blocks; head fusion and discard as in common implementations) and Chefer, Gur &
# Wolf 2021 (R = I; R += mean_h((grad * A)^+) @ R). The attention probabilities come from torch itself:
# each block's nn.MultiheadAttention is called with need_weights=True, average_attn_weights=False.

def _torch_attentions(model, x, target=None):
    """Per-block (N, H, T, T) attention probabilities (and, with `target`, the gradients of the target scores
    with respect to them): each block's nn.MultiheadAttention computed by hand from its own weights, so the
    probabilities are the tensor the output is computed from (torch's need_weights copy is off that path)."""
    store, saved = [], []
    for layer in model.encoder.layers:
        mha = layer.self_attention
        saved.append((mha, mha.forward))

        def forward(q, k, v, need_weights=False, _m=mha, **kw):
            n, t, c = q.shape
            h = _m.num_heads
            qkv = torch.nn.functional.linear(q, _m.in_proj_weight, _m.in_proj_bias)
            qq, kk, vv = (z.reshape(n, t, h, c // h).transpose(1, 2) for z in qkv.chunk(3, -1))
            a = torch.softmax(qq @ kk.transpose(-1, -2) / (c // h) ** 0.5, -1)
            if a.requires_grad:
                a.retain_grad()
            store.append(a)
            return _m.out_proj((a @ vv).transpose(1, 2).reshape(n, t, c)), None
        mha.forward = forward
    try:
        xt = torch.from_numpy(x)
        if target is None:
            with torch.no_grad():
                out = model(xt)
        else:
            out = model(xt)
            out[torch.arange(len(x)), torch.as_tensor(target)].sum().backward()
        with torch.no_grad():
            for mha, fwd in saved:
                mha.forward = fwd
            assert torch.allclose(out, model(xt), atol=1e-5), "the hand-written attention is not torch's"
        return [a.detach() for a in store], None if target is None else [a.grad for a in store]
    finally:
        for mha, fwd in saved:
            mha.forward = fwd


def torch_rollout(attentions, head_fusion="mean", discard_ratio=0.0):
    n, _, t, _ = attentions[0].shape
    eye = torch.eye(t, dtype=torch.float64)
    result = eye.expand(n, t, t)
    for a in attentions:
        a = a.double()
        fused = {"mean": lambda: a.mean(1), "max": lambda: a.amax(1), "min": lambda: a.amin(1)}[head_fusion]()
        if discard_ratio:
            flat = fused.reshape(n, -1).clone()
            for i in range(n):
                _, low = flat[i].topk(int(flat.shape[1] * discard_ratio), largest=False)
                flat[i, low[low != 0]] = 0
            fused = flat.reshape(n, t, t)
        step = (fused + eye) / 2
        result = (step / step.sum(-1, keepdim=True)) @ result
    return result[:, 0, 1:].reshape(n, SIZE // 4, SIZE // 4).numpy()


def torch_gradient_rollout(attentions, gradients):
    n, _, t, _ = attentions[0].shape
    result = torch.eye(t, dtype=torch.float64).expand(n, t, t)
    for a, g in zip(attentions, gradients):
        cam = (g.double() * a.double()).clamp(min=0).mean(1)
        result = result + cam @ result
    return result[:, 0, 1:].reshape(n, SIZE // 4, SIZE // 4).numpy()


def _close(ours, ref, what):
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert err <= 1e-4 and min(_pearson(o, r) for o, r in zip(ours, ref)) >= 0.9999, (what, err)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_rollout_matches_the_published_algorithm(exported, exporter):
    b = exported("vit", exporter)
    attentions, _ = _torch_attentions(b.model, b.x)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 65, 65)
    for options in ({}, {"head_fusion": "max"}, {"head_fusion": "min", "discard_ratio": 0.5}):
        r = b.ex.explain(b.x, method="rollout", target=b.targets, **options)
        ref = torch_rollout(attentions, **options)
        _close(r.raw, ref, options)
        assert r.maps.shape == (2, SIZE, SIZE) and all(np.ptp(m) > 0 for m in r.maps)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gradient_rollout_matches_chefer_et_al(exported, exporter):
    b = exported("vit", exporter)
    attentions, gradients = _torch_attentions(b.model, b.x, b.targets)
    r = b.ex.explain(b.x, method="gradient-rollout", target=b.targets)
    assert r.targets.tolist() == b.targets
    ref = torch_gradient_rollout(attentions, gradients)
    assert all(np.ptp(m) > 0 for m in ref), "a constant reference proves nothing"
    _close(r.raw, ref, "gradient-rollout")
    other = b.ex.explain(b.x, method="gradient-rollout", target=[b.targets[1], b.targets[0]]).raw
    assert not np.allclose(other, r.raw), "class-specific: another target gives another map"


def test_rollout_refuses_windowed_attention_and_cnns(exported):
    from onnx_saliency.errors import SaliencyError

    b = exported("swin", "legacy")
    with pytest.raises(SaliencyError, match="windowed attention"):
        b.ex.explain(b.x, method="rollout")
    v = exported("vit", "legacy")
    with pytest.raises(SaliencyError, match="head_fusion.*one of mean, max, min"):
        v.ex.explain(v.x, method="rollout", head_fusion="median")


@pytest.mark.parametrize("name", list(MODELS))
def test_cnn_structure_methods_refuse_transformers(exported, name, tmp_path):
    """TSGB, the SR map and Gradual Extrapolation are defined on a CNN's spatial down-sampling chain: on a ViT or
    Swin they refuse before running, naming the method, the file and what they need; the CLI prints `error:`."""
    import cv2
    from click.testing import CliRunner

    from cli.main import main
    from onnx_saliency.errors import SaliencyError

    b = exported(name, "legacy")
    for method in ("tsgb", "sr-map", "gradual-extrapolation", "gradcam+ge"):
        with pytest.raises(SaliencyError, match=r"is a transformer \(attention Softmax nodes\); .*down-sampling"):
            b.ex.explain(b.x, method=method)
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), np.full((32, 32, 3), 128, np.uint8))
    res = CliRunner().invoke(main, ["explain", str(b.path), str(img), "-m", "tsgb", "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code != 0 and res.output.startswith("error: ") and "-m tsgb: " in res.output
    assert not list((tmp_path / "o").glob("**/*.png")), "nothing half-written"
