"""Seed methods in `reference` mode against the authors' algorithms, written here in torch from reading their code
(not copied): mongeoroo/Relevance-CAM (modules/layers.py, modules/resnet.py), szandala/gradual-extrapolation
(v1) and szandala/Latent-Features-Detection gradual_extrapolation.py (v2), 123fxdx/CNNvisualizationTSGB and
Hey1Li/Salient-Relevance-Propagation. The reference functions below follow those files step by step, quirks
included (safe_divide, the BatchNorm relprop with running_var squared, the double conv bias, hooks in execution
order, torch's unbiased std, ...). Networks: torchvision architectures with seeded random weights and random
BatchNorm statistics (scales of both signs), at small input sizes and with few classes so that the suite stays
cheap; docs/seed-methods.md has the full-size numbers (benchmarks/seed_parity.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from onnx_saliency.parity import install_torchvision_cpu_shim  # noqa: E402

install_torchvision_cpu_shim()
torchvision = pytest.importorskip("torchvision")
F = torch.nn.functional
nn = torch.nn

from onnx_saliency import Explainer  # noqa: E402
from tests.exports import _quiet, _set_meta  # noqa: E402

PEARSON = 0.9999


def pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def signed_bn(model, seed: int) -> None:
    """Random BatchNorm statistics and affine parameters, about a third of the scales negative."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            sign = torch.where(torch.rand(n, generator=g) < 0.33, -1.0, 1.0)
            mod.weight.data = sign * (0.5 + torch.rand(n, generator=g))
            mod.bias.data = 0.2 * torch.randn(n, generator=g)
            mod.running_mean = 0.2 * torch.randn(n, generator=g)
            mod.running_var = 0.5 + torch.rand(n, generator=g)


def export(model, path, size: int, keep_bn: bool = True):
    """Legacy exporter; keep_bn: no constant folding, so the BatchNorm nodes stay (the legacy exporter's folding
    fuses them into the convs, as an export with folded BN)."""
    x = torch.zeros(1, 3, size, size)
    with _quiet():
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, do_constant_folding=not keep_bn,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    _set_meta(path, "raw", None)
    return path


def node_output(ex, prefix: str, op: str, last: bool = True) -> str:
    """The output of the last (first) `op` node whose name starts with `prefix` in the canonical graph."""
    hits = [n.output[0] for n in ex.model.canonical.graph.node if n.name.startswith(prefix) and n.op_type == op]
    assert hits, (prefix, op)
    return hits[-1] if last else hits[0]


# --- Relevance-CAM: modules/layers.py relprop, alpha = 1 ------------------------------------------------------

def safe_divide(a, b):
    return a / (b + (b == 0).to(b.dtype) * 1e-9) * (b != 0).to(b.dtype)


def _grad(z, x, s):
    return torch.autograd.grad(z, x, s, retain_graph=True)[0]


def rp_conv(conv, x, R):
    """Conv2d.relprop, non-input layer: z+ over signed inputs, the conv's own bias added to both partial sums."""
    px = x.clamp(min=0).detach().requires_grad_()
    nx = x.clamp(max=0).detach().requires_grad_()
    pw, nw = conv.weight.clamp(min=0), conv.weight.clamp(max=0)

    def z(xx, w):
        return F.conv2d(xx, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    z1, z2 = z(px, pw), z(nx, nw)
    s = safe_divide(R, z1 + z2)
    return px * _grad(z1, px, s) + nx * _grad(z2, nx, s)


def rp_linear(lin, x, R):
    px = x.clamp(min=0).detach().requires_grad_()
    nx = x.clamp(max=0).detach().requires_grad_()
    z1, z2 = F.linear(px, lin.weight.clamp(min=0)), F.linear(nx, lin.weight.clamp(max=0))
    s = safe_divide(R, z1 + z2)
    return px * _grad(z1, px, s) + nx * _grad(z2, nx, s)


def rp_bn(bn, x, R):
    """BatchNorm2d.relprop: x w R / (x w + 1e-9), w = gamma / sqrt(running_var**2 + eps) (squared, as written)."""
    w = (bn.weight / (bn.running_var ** 2 + bn.eps).sqrt())[None, :, None, None]
    return x * w * R / (x * w + 1e-9)


def rp_simple(fn, xs, R):
    """RelPropSimple (MaxPool2d, Add): R * x / f(x) routed by the gradient."""
    xs = [x.detach().requires_grad_() for x in xs]
    z = fn(*xs)
    s = safe_divide(R, z)
    grads = torch.autograd.grad(z, xs, s)
    return [x * g for x, g in zip(xs, grads)]


def rp_avgpool(size, x, R):
    px = x.clamp(min=0).detach().requires_grad_()
    z = F.adaptive_avg_pool2d(px, size)
    return px * _grad(z, px, safe_divide(R, z))


class Recorder:
    """Forward hooks: every module's input and output, by module."""

    def __init__(self, model):
        self.inp, self.out = {}, {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()]

    def _hook(self, module, inputs, output):
        # copies: torchvision's Bottleneck adds the shortcut into bn3's output in place (out += identity)
        self.inp[module] = inputs[0].detach().clone()
        self.out[module] = output.detach().clone()

    def close(self):
        for h in self.handles:
            h.remove()


def clrp(logits, target):
    n = logits.shape[1]
    R = torch.full_like(logits, -1.0 / n)
    R[:, target] = 1.0
    return R


def rcam_bottleneck(block, rec, R):
    """modules/resnet.py Bottleneck.relprop: relu3, add, downsample, bn3, conv3, relu2, bn2, conv2, relu1, bn1,
    conv1; main + shortcut summed at the block input."""
    main_out = rec.out[block.bn3]
    x = rec.inp[block.conv1]
    short = rec.out[block.downsample] if block.downsample is not None else x
    r_main, r_short = rp_simple(torch.add, [main_out, short], R)
    if block.downsample is not None:
        conv, bn = block.downsample[0], block.downsample[1]
        r_short = rp_conv(conv, rec.inp[conv], rp_bn(bn, rec.inp[bn], r_short))
    r = r_main
    for conv, bn in ((block.conv3, block.bn3), (block.conv2, block.bn2), (block.conv1, block.bn1)):
        r = rp_conv(conv, rec.inp[conv], rp_bn(bn, rec.inp[bn], r))
    return r + r_short


def rcam_resnet(model, x, target, stage: str):
    """Relevance-CAM at the output of `stage` (layer2 / layer3): CLRP at the logits, fc, avgpool, the blocks
    above the stage; alpha = spatial mean of R; map = sum_k alpha_k A_k, no ReLU."""
    rec = Recorder(model)
    with torch.no_grad():
        logits = model(x)
    rec.close()
    R = rp_linear(model.fc, rec.inp[model.fc], clrp(logits, target))
    R = rp_avgpool(model.avgpool.output_size, rec.inp[model.avgpool], R.reshape(len(x), -1, 1, 1))
    stages = ["layer1", "layer2", "layer3", "layer4"]
    for name in reversed(stages[stages.index(stage) + 1:]):
        for block in reversed(list(getattr(model, name))):
            R = rcam_bottleneck(block, rec, R)
    A = rec.out[getattr(model, stage)]
    alpha = R.mean(dim=(2, 3), keepdim=True)
    return (alpha * A).sum(1).detach().numpy()


def rcam_vgg(model, x, target, upto: int):
    """Relevance-CAM at the output of features[upto] (vgg16_bn): classifier (Linear, ReLU, Dropout), avgpool,
    then the feature layers above `upto` in reverse."""
    rec = Recorder(model)
    with torch.no_grad():
        logits = model(x)
    rec.close()
    R = clrp(logits, target)
    for m in reversed(list(model.classifier)):
        if isinstance(m, nn.Linear):
            R = rp_linear(m, rec.inp[m], R)
    R = R.reshape(rec.out[model.avgpool].shape)
    if isinstance(model.avgpool, nn.AdaptiveAvgPool2d):
        R = rp_avgpool(model.avgpool.output_size, rec.inp[model.avgpool], R)
    for m in reversed(list(model.features)[upto + 1:]):
        if isinstance(m, nn.Conv2d):
            R = rp_conv(m, rec.inp[m], R)
        elif isinstance(m, nn.BatchNorm2d):
            R = rp_bn(m, rec.inp[m], R)
        elif isinstance(m, nn.MaxPool2d):
            R = rp_simple(m, [rec.inp[m]], R)[0]
    A = rec.out[model.features[upto]]
    alpha = R.mean(dim=(2, 3), keepdim=True)
    return (alpha * A).sum(1).detach().numpy()


def small_vgg16_bn(classes: int = 10):
    """VGG-16 (BN) feature stack as torchvision builds it, with a small head for 64 px inputs (the 25088-wide
    first Linear would make the test export 0.5 GB): pool5 (2x2) -> Linear 2048-64-64-classes."""
    torch.manual_seed(0)
    m = torchvision.models.vgg16_bn(num_classes=classes)
    m.avgpool = nn.Identity()
    m.classifier = nn.Sequential(nn.Linear(512 * 4, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                 nn.ReLU(True), nn.Dropout(), nn.Linear(64, classes))
    signed_bn(m, 1)
    return m.eval()


def resnet50(classes: int = 10):
    torch.manual_seed(0)
    m = torchvision.models.resnet50(num_classes=classes)
    signed_bn(m, 2)
    return m.eval()


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed_parity")
    out = {}
    for name, build in (("resnet50", resnet50), ("vgg16_bn", small_vgg16_bn)):
        model = build()
        out[name] = (model, Explainer(export(model, folder / f"{name}.onnx", 64), threads=2))
    out["resnet50_folded"] = (out["resnet50"][0],
                              Explainer(export(out["resnet50"][0], folder / "r50f.onnx", 64, keep_bn=False), threads=2))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32))
    return out, x


@pytest.mark.slow
@pytest.mark.parametrize("stage,target", [("layer3", 3), ("layer3", 7), ("layer2", 3)])
def test_relevance_cam_reference_equals_the_authors_resnet50(nets, stage, target):
    (model, ex), x = nets[0]["resnet50"], nets[1]
    ref = rcam_resnet(model, x.clone(), target, stage)
    layer = node_output(ex, f"/{stage}/", "Relu")
    r = ex.explain(x.numpy(), method="relevance-cam", layer=layer, target=target, reference="true")
    assert pearson(r.raw, ref) >= PEARSON, pearson(r.raw, ref)
    assert r.options["reference"] == "true" and any("BatchNorm passes" in n for n in r.notes)
    default = ex.explain(x.numpy(), method="relevance-cam", layer=layer, target=target)
    # the default (BN folded into the conv, zennit's z+) is a different, documented rule: the test can tell
    assert pearson(default.raw, ref) < pearson(r.raw, ref)


@pytest.mark.slow
def test_relevance_cam_reference_equals_the_authors_vgg16_bn(nets):
    (model, ex), x = nets[0]["vgg16_bn"], nets[1]
    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    layer = [n.output[0] for n in ex.model.canonical.graph.node if n.op_type == "MaxPool"][2]  # pool3
    ref = rcam_vgg(model, x.clone(), 4, pools[2])
    r = ex.explain(x.numpy(), method="relevance-cam", layer=layer, target=4, reference="true")
    assert pearson(r.raw, ref) >= PEARSON, pearson(r.raw, ref)


# --- Gradual Extrapolation: gradual_extrapolation.py v1 (3c09801) and v2 (Latent-Features-Detection) -----------

def ge_hooks(model, version: int):
    """register_hooks: every MaxPool2d, every strided Conv2d (v2: only the first strided conv of each container),
    walking children recursively; the hook records the first hooked module's input (once) and every output."""
    excitations, handles = [], []

    def hook(module, inputs, output):
        if not excitations:
            excitations.append(inputs[0].detach())
        excitations.append(output.detach())

    def register(container):
        first = True
        for layer in container.children():
            if list(layer.children()):
                register(layer)
            elif isinstance(layer, nn.MaxPool2d):
                handles.append(layer.register_forward_hook(hook))
            elif isinstance(layer, nn.Conv2d) and layer.stride > (1, 1) and (version == 1 or first):
                handles.append(layer.register_forward_hook(hook))
                first = False

    register(model)
    return excitations, handles


def ge_reference(model, x, heatmap, version: int):
    excitations, handles = ge_hooks(model, version)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    H = torch.from_numpy(np.asarray(heatmap, np.float32))[:, None]
    for e in excitations[::-1]:
        if version == 2 and H.shape[-1] >= e.shape[-1]:
            continue
        H = F.interpolate(H, size=e.shape[2:], mode="bilinear", align_corners=False)
        H = H * (e.sum(dim=1, keepdim=True) / e.max())
    z = ((H - H.mean()) / H.std()).clip(-1, 1)
    return ((z - z.min()) / (z.max() - z.min()))[:, 0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("net", ["resnet50", "vgg16_bn"])
@pytest.mark.parametrize("version", [1, 2])
def test_ge_reference_equals_the_authors_code(nets, net, version):
    """Pre-BN excitations come from un-folding the BatchNorms canonicalisation folded (random, signed BN)."""
    (model, ex), x = nets[0][net], nets[1]
    layer = (node_output(ex, "/layer4/", "Relu") if net == "resnet50"
             else [n.input[0] for n in ex.model.canonical.graph.node if n.op_type == "MaxPool"][-1])  # conv5_3
    r = ex.explain(x.numpy(), method="gradcam+ge", layer=layer, target=5, reference=f"v{version}")
    ref = ge_reference(model, x.clone(), r.raw, version)
    assert pearson(r.maps, ref) >= PEARSON, pearson(r.maps, ref)
    if net == "resnet50":
        assert any("un-folded" in n for n in r.notes), r.notes
        # the same network exported with BN already folded has no pre-BN tensor: a measurable difference
        folded = nets[0]["resnet50_folded"][1]
        f = folded.explain(x.numpy(), method="gradcam+ge", layer=node_output(folded, "/layer4/", "Relu"),
                           target=5, reference=f"v{version}")
        assert pearson(f.maps, ref) < PEARSON


# --- TSGB: explainer/RGBP_cbp/rgbp.py + functionsGBP.py (the code 'TSGB' runs) --------------------------------

class _TsgbConv(torch.autograd.Function):
    """WoneConv2dG with the "slim" backward: channel sums over all channels whatever the groups."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, bias)
        ctx.geometry = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        kh, kw = weight.shape[2:]
        ones = torch.ones(1, 1, kh, kw, dtype=x.dtype)
        z = F.conv2d(x.abs().sum(1, keepdim=True), ones, None, stride, padding, dilation)
        s = (g * y).sum(1, keepdim=True) / (z + 1e-10)
        pad = [x.shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + 1)
               for i, k in enumerate((kh, kw))]
        spread = F.conv_transpose2d(s, ones, None, stride, padding, tuple(pad), 1, dilation)
        return spread.repeat(1, x.shape[1], 1, 1) * x.sign(), None, None, None, None, None, None


class _TsgbBN(torch.autograd.Function):
    """LRPBNG: g * BN(x) / (x + 1e-10)."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g):
        x, mean, var, weight, bias = ctx.saved_tensors
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, ctx.eps)
        return g * y / (x + 1e-10), None, None, None, None, None


class _TsgbLinear(torch.autograd.Function):
    """CLinearG on the classifier: g (W+ + beta W-), beta = x W+^T / |x W-^T|."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        beta = (x @ wp.t()) / (x @ wn.t()).abs()
        return g @ wp + (g * beta) @ wn, None, None


def tsgb_reference(model, x, target):
    import copy
    import types

    m = copy.deepcopy(model)
    for mod in m.modules():
        if type(mod) is nn.Conv2d:
            mod.forward = types.MethodType(lambda self, t: _TsgbConv.apply(
                t, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups), mod)
        elif type(mod) is nn.BatchNorm2d:
            mod.forward = types.MethodType(lambda self, t: _TsgbBN.apply(
                t, self.running_mean, self.running_var, self.weight, self.bias, self.eps), mod)
    last = list(m.children())[-1]
    last = last[-1] if isinstance(last, nn.Sequential) else last
    last.forward = types.MethodType(lambda self, t: _TsgbLinear.apply(t, self.weight, self.bias), last)
    x = x.clone().requires_grad_()
    out = m(x)
    seed = torch.zeros_like(out)
    seed[:, target] = 1.0
    out.backward(seed)
    return (x.grad * x).sum(1).detach().numpy()


def mobilenet_v2(classes: int = 10):
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(num_classes=classes)
    signed_bn(m, 3)
    return m.eval()


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    model = mobilenet_v2()
    return model, Explainer(export(model, tmp_path_factory.mktemp("mnv2") / "mnv2.onnx", 64), threads=2)


@pytest.mark.slow
def test_tsgb_reference_equals_the_authors_code_on_mobilenet_v2(mobilenet, nets):
    """Depthwise convs: the reference's slim backward ignores the groups; reference=true does too."""
    model, ex = mobilenet
    x = nets[1]
    ref = tsgb_reference(model, x, 2)
    r = ex.explain(x.numpy(), method="tsgb", target=2, reference="true")
    assert pearson(r.maps, ref) >= PEARSON, pearson(r.maps, ref)
    assert r.options["reference"] == "true" and any("grouped" in n for n in r.notes)
    default = ex.explain(x.numpy(), method="tsgb", target=2)
    assert pearson(default.maps, ref) < PEARSON  # per-group redistribution: the documented difference


@pytest.mark.slow
@pytest.mark.parametrize("net", ["resnet50", "vgg16_bn"])
def test_tsgb_equals_the_authors_code_without_grouped_convs(nets, net):
    (model, ex), x = nets[0][net], nets[1]
    ref = tsgb_reference(model, x, 6)
    for reference in ("false", "true"):  # no grouped convs: the same graph either way
        r = ex.explain(x.numpy(), method="tsgb", target=6, reference=reference)
        assert pearson(r.maps, ref) >= PEARSON, (reference, pearson(r.maps, ref))


# --- SR map, step A: "Imagenet_Alex vs VGG16.ipynb" relprop ----------------------------------------------------

def sr_relevance(model, x, target):
    """The notebook's rules: logit of the target at the output; Linear z+ without bias (+1e-9); ReLU and (here) LRN
    pass; MaxPool x * max_unpool2d(R / (y + 1e-9)) (overlapping windows that share an argmax: the last write
    wins); Conv LRP-0, x * conv_transpose(R / (y + 1e-9)) with y including the bias. (output_size is passed to
    max_unpool2d so that pools whose input the default size formula misses, at small inputs, work.)"""
    rec = Recorder(model)
    with torch.no_grad():
        logits = model(x)
    rec.close()
    R = torch.zeros_like(logits)
    R[:, target] = logits[:, target]
    with torch.no_grad():
        for m in reversed(list(model.classifier)):
            if isinstance(m, nn.Linear):
                V = m.weight.clamp(min=0)
                X = rec.inp[m]
                R = X * ((R / (X @ V.t() + 1e-9)) @ V)
        R = R.reshape(rec.out[model.features].shape)
        for m in reversed(list(model.features)):
            X, Y = rec.inp[m], rec.out[m]
            if isinstance(m, nn.MaxPool2d):
                _, idx = F.max_pool2d(X, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
                R = X * F.max_unpool2d(R / (Y + 1e-9), idx, m.kernel_size, m.stride, m.padding, output_size=X.shape)
            elif isinstance(m, nn.Conv2d):
                pad = [X.shape[2 + i] - ((Y.shape[2 + i] - 1) * m.stride[i] - 2 * m.padding[i] + m.kernel_size[i])
                       for i in range(2)]
                R = X * F.conv_transpose2d(R / (Y + 1e-9), m.weight, None, m.stride, m.padding, tuple(pad), m.groups)
    return R.numpy()


class _LRNFunction(torch.autograd.Function):
    """torch's LocalResponseNorm, exported as one ONNX LRN node (as Caffe AlexNet in the ONNX model zoo has it;
    the torch exporters would write its decomposition)."""

    @staticmethod
    def forward(ctx, x):
        return F.local_response_norm(x, 5, 1e-4, 0.75, 1.0)

    @staticmethod
    def symbolic(g, x):
        return g.op("LRN", x, size_i=5, alpha_f=1e-4, beta_f=0.75, bias_f=1.0)


class LRN(nn.Module):
    def forward(self, x):
        return _LRNFunction.apply(x)


def small_alexnet(caffe: bool, classes: int = 10):
    """torchvision AlexNet's feature stack, or the Caffe/paper one (96-256-384-384-256 with LRN after conv1 and
    conv2 and two-group conv2/4/5), with a small head for 112 px inputs (pool5 is 2x2)."""
    torch.manual_seed(0)
    if caffe:
        features = nn.Sequential(
            nn.Conv2d(3, 96, 11, 4, 2), nn.ReLU(), LRN(), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, 1, 2, groups=2), nn.ReLU(), LRN(), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(), nn.Conv2d(384, 384, 3, 1, 1, groups=2), nn.ReLU(),
            nn.Conv2d(384, 256, 3, 1, 1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2))
    else:
        features = torchvision.models.alexnet().features
    m = nn.Module()
    m.features, m.avgpool = features, nn.Flatten()
    m.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 4, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 64),
                                 nn.ReLU(), nn.Linear(64, classes))
    m.forward = lambda x: m.classifier(m.avgpool(m.features(x)))
    for conv in [c for c in m.modules() if isinstance(c, nn.Conv2d)]:
        nn.init.normal_(conv.bias, 0.0, 0.05)  # biases of both signs in z
    return m.eval()


class _Net(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.features, self.avgpool, self.classifier = inner.features, inner.avgpool, inner.classifier

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


@pytest.mark.slow
@pytest.mark.parametrize("caffe", [False, True], ids=["torchvision-alexnet", "caffe-alexnet-lrn"])
def test_sr_map_reference_equals_the_notebook_on_alexnet(tmp_path, caffe):
    from onnx_saliency.methods.sr_map import heatmap_image

    model = _Net(small_alexnet(caffe)).eval()
    ex = Explainer(export(model, tmp_path / "alexnet.onnx", 112), threads=2)
    assert any(n.op_type == "LRN" for n in ex.model.canonical.graph.node) == caffe
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 112, 112)).astype(np.float32))
    target = 3
    ref = sr_relevance(model, x.clone(), target)
    r = ex.explain(x.numpy(), method="sr-map", target=target, reference="true", ca_resolution=48)
    assert pearson(r.attributions, ref) >= PEARSON, pearson(r.attributions, ref)
    image = np.abs(ref[0]).transpose(1, 2, 0)
    image = (255 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8)  # the notebook's cast
    ours = heatmap_image(r.attributions[0], truncate=True)
    assert np.mean(ours == image) > 0.999 and np.abs(ours.astype(int) - image).max() <= 1
    assert r.options["reference"] == "true" and any("max_unpool2d" in n for n in r.notes)
    # the default adds where windows share an argmax (conserving): on overlapping pools that is a difference
    default = ex.explain(x.numpy(), method="sr-map", target=target, ca_resolution=48, ca_grid=16)
    assert pearson(default.attributions, ref) < PEARSON
