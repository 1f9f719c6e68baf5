"""Torch helpers for the parity tests: let torchvision import on machines whose torch build lacks the
torchvision C++ ops, and randomise BatchNorm statistics.

torchvision registers fake kernels for ``torchvision::nms`` at import time and fails when the operator was
never defined (CPU torch wheel without torchvision's extension). Defining the schemas first is enough
for the pure-Python parts the parity tests use (pytorch-grad-cam's image utilities, model definitions).
Call :func:`install_torchvision_cpu_shim` before the first ``import torchvision``.
"""

_installed = False
_lib = None  # keep the Library alive: dropping it would unregister the definitions


def install_torchvision_cpu_shim() -> None:
    global _installed, _lib
    if _installed:
        return
    import torch

    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        _lib = torch.library.Library("torchvision", "DEF")
        _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _installed = True


def randomise_bn(model, seed: int) -> None:
    """Give every BatchNorm2d non-trivial statistics and affine parameters (seeded), so that folding them
    is really tested: a fresh torchvision model has mean 0, var 1, weight 1, bias 0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.weight.data = 0.5 + torch.rand(n, generator=g)
            mod.bias.data = 0.2 * torch.randn(n, generator=g)
            mod.running_mean = 0.2 * torch.randn(n, generator=g)
            mod.running_var = 0.5 + torch.rand(n, generator=g)
