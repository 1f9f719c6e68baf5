"""Parity of the CAM family and the pixel-gradient methods with the PyTorch references.

Models: torchvision ResNet-18, VGG-11 and DenseNet-121 with seeded random weights (torch.manual_seed(0)),
exported here with the legacy exporter (opset 17, dynamic batch), built once per module. BatchNorm statistics
and affine parameters are randomised too: at their init values BN is the identity, which would make the BN
folded by the exporter (ResNet) and DenseNet's 62 kept BatchNormalization nodes (after a Concat, nothing to
fold into; the VJP's BN rule) trivially right. VGG-11's classifier keeps its layout (Linear-ReLU-Dropout x2,
Linear) at width 256 instead of 4096: the 4096-wide head is a 500 MB ONNX file whose export + load alone
take ~50 s on two cores; the head width plays no part in what is compared. Inputs: two smooth, image-like,
ImageNet-normalised images; targets [top-1 resolved in the graph (-1), an explicit non-top-1 class].

References:
- CAM family (gradcam, gradcam++, xgradcam, layercam, hirescam, gradcam-elementwise, eigencam): the
  pytorch-grad-cam classes at ResNet-18 ``layer4[-1]``, VGG-11's last ``features`` ReLU and DenseNet-121
  ``features``, from one forward/backward pass (see _pgc_reference). The ONNX tensor of a torch module is
  found by value: every candidate layer of the same shape is exposed and compared with a forward-hook capture.
  DenseNet: ``forward`` applies ``F.relu(features, inplace=True)``, which overwrites pytorch-grad-cam's saved
  (detached, storage-sharing) activation while its gradient hook gets the gradient w.r.t. the pre-ReLU tensor:
  stock pytorch-grad-cam mixes relu(norm5) activations with norm5 gradients, which no single tensor has
  (Grad-CAM Pearson ~0.99 against either). A forward hook registered after pytorch-grad-cam's hands the rest
  of the network a clone, so the reference is the clean "norm5 output and its gradient".
- Score-CAM (K masked forward passes): ResNet-18 exported at 64x64 (same seeded weights), variant "pgc".
- CAM (Zhou et al.): torchcam's ``CAM`` (fc weights) at the global-pooling input (ResNet-18 ``layer4``,
  DenseNet-121 relu(features)). VGG's head is not global pooling + one linear layer.
- gradient, gradient-x-input: torch autograd, all three models at 224. Guided backprop: pytorch-grad-cam's
  ``GuidedBackpropReLUModel`` (ResNet-18, VGG-11; DenseNet's last ReLU is functional, it cannot swap it).
  Guided Grad-CAM: that times pytorch-grad-cam's GradCAM map.
- SmoothGrad (the same noise array on both sides) and Integrated Gradients (right Riemann sum, 20 steps,
  zero baseline): torch autograd on the 64x64 ResNet-18.

Bars. CAM maps (in [0, 1], 224x224): Pearson >= 0.9999 per image and max |diff| <= 2e-3 (Pearson is blind
to affine changes such as a missing min-max). Pixel attributions and maps: Pearson >= 0.9999 and relative L2
error <= 1e-2 per image (the L2 term catches scale and sign). Why not max |diff| <= 1e-4 * max |ref| for
gradients: float32 input gradients of deep ReLU/MaxPool nets are not continuous in the rounding: a ReLU input
or a MaxPool tie within rounding of its kink goes either way, moving gradient mass. Torch float32 itself,
against torch float64 on these models, shows relative max errors up to 1.5e-2 (Pearson down to 0.99998)
on some inputs, and DenseNet-121 a broad ~3e-4 relative L2 from its many BN-ReLU kinks.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from onnx_saliency.parity import install_torchvision_cpu_shim  # noqa: E402
from tests.torch_shim import randomise_bn  # noqa: E402

install_torchvision_cpu_shim()  # before torchvision, pytorch_grad_cam and torchcam import it
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")

from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMElementWise, GradCAMPlusPlus,  # noqa: E402
                              GuidedBackpropReLUModel, HiResCAM, LayerCAM, ScoreCAM, XGradCAM)
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from onnx_saliency import Explainer  # noqa: E402

pytestmark = pytest.mark.parity

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CAM_PEARSON = 0.9999
CAM_MAX_ABS = 2e-3
PIXEL_PEARSON = 0.9999
PIXEL_REL_L2 = 1e-2

PGC_CLASSES = {
    "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
    "hirescam": HiResCAM, "gradcam-elementwise": GradCAMElementWise, "eigencam": EigenCAM,
}


# --- models --------------------------------------------------------------------------------------------------
def _resnet18():
    m = torchvision.models.resnet18(weights=None)
    return m, m.layer4[-1]


def _vgg11():
    m = torchvision.models.vgg11(weights=None)
    nn = torch.nn
    m.classifier[0], m.classifier[3], m.classifier[6] = nn.Linear(512 * 7 * 7, 256), nn.Linear(256, 256), \
        nn.Linear(256, 1000)
    return m, [mod for mod in m.features if isinstance(mod, nn.ReLU)][-1]


def _densenet121():
    m = torchvision.models.densenet121(weights=None)
    return m, m.features


MODELS = {  # name -> (builder, input size)
    "resnet18": (_resnet18, 224),
    "vgg11": (_vgg11, 224),
    "densenet121": (_densenet121, 224),
    "resnet18@64": (_resnet18, 64),  # Score-CAM, SmoothGrad, Integrated Gradients
}


def _images(n, size, seed):
    """Smooth, image-like inputs, ImageNet-normalised."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 3, size // 8, size // 8)).astype(np.float32)
    img = base.repeat(8, axis=2).repeat(8, axis=3) * 0.7 + 0.3 * rng.uniform(0, 1, (n, 3, size, size))
    return ((img - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


@dataclass
class Bundle:
    name: str
    model: object            # the torch model (eval)
    module: object           # the torch target module of the CAM methods
    ex: Explainer
    x: np.ndarray            # (2, 3, S, S)
    logits: np.ndarray       # torch logits of x
    act: np.ndarray          # the module's output, captured by a forward hook (before any in-place op)
    targets: list            # torch-side classes: [top-1 of image 0, a non-top-1 class of image 1]
    ours: list               # the same for our API: [-1 (top-1, resolved in the graph), that class]
    refs: dict = field(default_factory=dict)  # memoised torch references (one torch pass per method)

    @property
    def xt(self):
        return torch.from_numpy(self.x.copy())

    def pgc_targets(self):
        return [ClassifierOutputTarget(t) for t in self.targets]

    def ref(self, key, compute):
        if key not in self.refs:
            self.refs[key] = compute()
        return self.refs[key]

    def match(self, act) -> str:
        """The one candidate layer whose values equal `act` (torch), exposing all same-shape candidates once."""
        def expose_candidates():
            names = [la.tensor for la in self.ex.layers() if tuple(la.shape[1:]) == self.act.shape[1:]]
            out = self.ex.engine.run(self.x, expose=names)
            return {k: out[k] for k in names}

        errors = {k: float(np.abs(v - act).max()) for k, v in self.ref("candidates", expose_candidates).items()}
        tol = 1e-4 * float(np.abs(act).max())
        hits = [k for k, e in errors.items() if e <= tol]
        assert len(hits) == 1, f"{self.name}: no unique ONNX tensor for the torch activation: {errors}"
        return hits[0]

    @property
    def layer(self) -> str:
        return self.ref("layer", lambda: self.match(self.act))


def _build(name, folder) -> Bundle:
    builder, size = MODELS[name]
    torch.manual_seed(0)
    model, module = builder()
    randomise_bn(model, 1)
    model.eval()
    x = _images(2, size, seed=0)
    path = folder / f"{name.replace('@', '_')}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "You are using the legacy TorchScript-based export"
        torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    captured = {}
    hook = module.register_forward_hook(lambda mod, inp, out: captured.__setitem__("a", out.detach().clone()))
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    hook.remove()
    assert np.isfinite(logits).all() and logits.std() > 1e-3, f"{name}: degenerate logits (std {logits.std()})"
    top = logits.argmax(1)
    alt = int(np.argsort(logits[1])[-50])  # explicit and not the top-1: the 50th best class of image 1
    ex = Explainer(path, preset="torchvision")
    return Bundle(name, model, module, ex, x, logits, captured["a"].numpy(), [int(top[0]), alt], [-1, alt])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = {}

    def get(name) -> Bundle:
        if name not in cache:
            cache[name] = _build(name, tmp_path_factory.mktemp("parity"))
        return cache[name]

    return get


# --- comparisons ---------------------------------------------------------------------------------------------
def _pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _per_image_pearson(ours, ref) -> list[float]:
    return [_pearson(o, r) for o, r in zip(ours, ref)]


def _rel_max(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _check_cam(ours, ref, what):
    """Maps in [0, 1]: Pearson per image, and the values themselves (Pearson is blind to affine changes)."""
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    assert all(r.std() > 0 for r in ref), f"{what}: a reference map is constant; the comparison would be vacuous"
    p, d = _per_image_pearson(ours, ref), float(np.abs(ours - ref).max())
    assert min(p) >= CAM_PEARSON and d <= CAM_MAX_ABS, \
        f"{what}: Pearson per image {p}, max |diff| {d:.3g} (bars: {CAM_PEARSON}, {CAM_MAX_ABS})"


def _rel_l2(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _check_pixels(ours, ref, what, pearson=PIXEL_PEARSON, rel_l2=PIXEL_REL_L2):
    """Per image: Pearson (shape) and relative L2 error (scale and sign, which Pearson cannot see)."""
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    p = _per_image_pearson(ours, ref)
    e = [_rel_l2(o, r) for o, r in zip(ours, ref)]
    assert min(p) >= pearson and max(e) <= rel_l2, \
        (f"{what}: Pearson per image {p}, relative L2 error {e}, max |diff| / max |ref| = "
         f"{_rel_max(ours, ref):.3g} (bars: Pearson >= {pearson}, relative L2 <= {rel_l2})")


def _check_targets(b, r):
    assert r.targets.tolist() == b.targets, f"{b.name}: resolved targets {r.targets.tolist()} vs {b.targets}"
    want = b.logits[[0, 1], b.targets]
    np.testing.assert_allclose(r.scores, want, rtol=1e-4, atol=1e-5 * np.abs(b.logits).max())


@contextlib.contextmanager
def _pgc(cls, b):
    """A pytorch-grad-cam object on b.module whose saved activation survives in-place ops downstream."""
    cam = cls(model=b.model, target_layers=[b.module])
    # runs after pytorch-grad-cam's hooks: the rest of the network gets a copy (see the module docstring)
    guard = b.module.register_forward_hook(lambda mod, inp, out: out.clone())
    try:
        yield cam
    finally:
        guard.remove()
        cam.activations_and_grads.release()


def _pgc_reference(b) -> dict:
    """pytorch-grad-cam's maps for every CAM class, from ONE forward/backward pass.

    GradCAM runs end to end (hooks, forward, backward, maps). The other classes then compute their maps from
    the activations and gradients GradCAM's hooks captured, through their own code path
    (compute_cam_per_layer -> get_cam_image / get_cam_weights -> ReLU -> scale_cam_image -> aggregate):
    exactly what their __call__ does after its forward/backward, which does not depend on the class.
    """
    def compute():
        targets = b.pgc_targets()
        with _pgc(GradCAM, b) as cam:
            maps = {"gradcam": cam(input_tensor=b.xt, targets=targets)}
            acts = list(cam.activations_and_grads.activations)
            grads = list(cam.activations_and_grads.gradients)
        assert len(acts) == len(grads) == 1, f"{b.name}: hooks captured {len(acts)} activations, {len(grads)} grads"
        for method, cls in PGC_CLASSES.items():
            if method in maps:
                continue
            other = cls(model=b.model, target_layers=[b.module])
            try:
                other.activations_and_grads.activations = list(acts)
                other.activations_and_grads.gradients = list(grads)
                maps[method] = other.aggregate_multi_layers(other.compute_cam_per_layer(b.xt, targets, False))
            finally:
                other.activations_and_grads.release()
        return maps
    return b.ref("pgc", compute)


def _autograd(b, xs, targets):
    """d(sum_i logits[i, targets[i]]) / d xs, one forward/backward over the whole batch (BN in eval mode:
    the images do not interact, so this is every image's own gradient)."""
    xt = torch.from_numpy(np.ascontiguousarray(xs, np.float32)).requires_grad_(True)
    out = b.model(xt)
    out[torch.arange(len(xs)), torch.as_tensor(targets)].sum().backward()
    return xt.grad.numpy()


# --- CAM family ----------------------------------------------------------------------------------------------
CAM_CASES = [(model, method) for model in ("resnet18", "vgg11", "densenet121") for method in PGC_CLASSES]


@pytest.mark.parametrize("name,method", CAM_CASES)
def test_cam_family_matches_pytorch_grad_cam(zoo, name, method):
    b = zoo(name)
    ref = _pgc_reference(b)[method]
    r = b.ex.explain(b.x, method=method, layer=b.layer, target=b.ours)
    _check_targets(b, r)
    _check_cam(r.maps, ref, f"{name} {method} at {b.layer}")


def test_layers_are_the_intended_tensors(zoo):
    """The value matching found the tensors we mean, and DenseNet keeps its BatchNormalization nodes."""
    ops = {name: {la.tensor: la.op for la in zoo(name).ex.layers()}[zoo(name).layer]
           for name in ("resnet18", "vgg11", "densenet121")}
    assert ops == {"resnet18": "Relu", "vgg11": "Relu", "densenet121": "BatchNormalization"}
    assert len(zoo("densenet121").ex.model.report.kept_bn) == 62  # 58 norm1 + 3 transition norms + norm5


def test_scorecam_matches_pytorch_grad_cam(zoo, monkeypatch):
    import pytorch_grad_cam.score_cam

    monkeypatch.setattr(pytorch_grad_cam.score_cam.tqdm, "tqdm", lambda it, *a, **k: it)  # its progress bars
    b = zoo("resnet18@64")

    def compute():
        with _pgc(ScoreCAM, b) as cam:
            cam.batch_size = 256
            return cam(input_tensor=b.xt, targets=b.pgc_targets())

    ref = b.ref("ScoreCAM", compute)
    r = b.ex.explain(b.x, method="scorecam", layer=b.layer, target=b.ours, batch_size=256, variant="pgc")
    _check_targets(b, r)
    _check_cam(r.maps, ref, f"{b.name} scorecam at {b.layer}")


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_cam_matches_torchcam(zoo, name):
    TorchCAM = pytest.importorskip("torchcam.methods").CAM

    b = zoo(name)
    # the global-pooling input: ResNet's layer4 output, DenseNet's relu(features) (its forward applies F.relu)
    layer = b.match(np.maximum(b.act, 0))
    target_layer, fc = {"resnet18": ("layer4", "fc"), "densenet121": ("features", "classifier")}[name]
    with TorchCAM(b.model, target_layer=target_layer, fc_layer=fc) as extractor:
        with torch.no_grad():
            b.model(b.xt)
        # torchcam keeps the hooked tensor itself: for DenseNet, F.relu(..., inplace=True) has made it relu(features)
        ref_raw = np.maximum(extractor(class_idx=b.targets, normalized=False)[0].numpy(), 0)
    r = b.ex.explain(b.x, method="cam", layer=layer, target=b.ours)
    _check_targets(b, r)
    _check_pixels(r.raw, ref_raw, f"{name} cam at {layer} (layer resolution)", pearson=CAM_PEARSON, rel_l2=1e-4)
    # pytorch-grad-cam's pipeline on the torchcam map: scale_cam_image per layer, then aggregate's min-max
    _check_cam(r.maps, scale_cam_image(scale_cam_image(ref_raw, b.x.shape[:1:-1])), f"{name} cam at {layer}")


# --- pixel methods -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "densenet121"])
@pytest.mark.parametrize("method", ["gradient", "gradient-x-input"])
def test_input_gradients_match_autograd(zoo, name, method):
    b = zoo(name)
    grad = b.ref("autograd", lambda: _autograd(b, b.x, b.targets))
    r = b.ex.explain(b.x, method=method, target=b.ours)
    _check_targets(b, r)
    if method == "gradient":
        ref_attr, ref_map = grad, np.abs(grad).max(axis=1)
    else:
        ref_attr = grad * b.x
        ref_map = ref_attr.sum(axis=1)
    _check_pixels(r.attributions, ref_attr, f"{name} {method} attributions")
    _check_pixels(r.maps, ref_map, f"{name} {method} maps")


def _pgc_guided_backprop(b):
    """GuidedBackpropReLUModel explains one image (its first) per call: one call per image."""
    def compute():
        gbp = GuidedBackpropReLUModel(copy.deepcopy(b.model))  # it swaps the ReLU modules of the model it gets
        return np.stack([gbp(torch.from_numpy(b.x[i:i + 1].copy()), target_category=t).transpose(2, 0, 1)
                         for i, t in enumerate(b.targets)])
    return b.ref("GuidedBackprop", compute)


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_guided_backprop_matches_pytorch_grad_cam(zoo, name):
    b = zoo(name)
    ref = _pgc_guided_backprop(b)
    r = b.ex.explain(b.x, method="guided-backprop", target=b.ours)
    _check_targets(b, r)
    _check_pixels(r.attributions, ref, f"{name} guided-backprop attributions")


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_guided_gradcam_matches_pytorch_grad_cam(zoo, name):
    b = zoo(name)
    ref = _pgc_guided_backprop(b) * _pgc_reference(b)["gradcam"][:, None]
    r = b.ex.explain(b.x, method="guided-gradcam", layer=b.layer, target=b.ours)
    _check_targets(b, r)
    _check_pixels(r.attributions, ref, f"{name} guided-gradcam attributions")


def test_smoothgrad_matches_autograd_with_the_same_noise(zoo):
    b = zoo("resnet18@64")
    n = 8
    span = (b.x.max(axis=(1, 2, 3)) - b.x.min(axis=(1, 2, 3)))[:, None, None, None]
    noise = (np.random.default_rng(7).standard_normal((n,) + b.x.shape) * (0.15 * span)).astype(np.float32)
    noisy = (b.x[None] + noise).reshape((-1,) + b.x.shape[1:])
    grads = _autograd(b, noisy, b.targets * n).reshape((n,) + b.x.shape)
    ref = grads.mean(axis=0)
    r = b.ex.explain(b.x, method="smoothgrad", target=b.ours, noise=noise)
    _check_targets(b, r)
    _check_pixels(r.attributions, ref, "smoothgrad attributions")
    _check_pixels(r.maps, np.abs(ref).max(axis=1), "smoothgrad maps")


def test_integrated_gradients_match_autograd(zoo):
    b = zoo("resnet18@64")
    m = 20
    alphas = (np.arange(1, m + 1, dtype=np.float32) / m)[:, None, None, None, None]
    path = (alphas * b.x[None]).reshape((-1,) + b.x.shape[1:])  # zero baseline
    grads = _autograd(b, path, b.targets * m).reshape((m,) + b.x.shape)
    ref = b.x * grads.mean(axis=0)
    r = b.ex.explain(b.x, method="integrated-gradients", target=b.ours)
    _check_targets(b, r)
    _check_pixels(r.attributions, ref, "integrated-gradients attributions")
    _check_pixels(r.maps, ref.sum(axis=1), "integrated-gradients maps")
