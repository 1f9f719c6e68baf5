"""Torch helpers for the parity tests: the torchvision import shim (shipped in the package as
:mod:`onnx_saliency.parity`, where users of the [parity] extra meet it; re-exported here) and a seeded
BatchNorm randomiser."""

from onnx_saliency.parity import install_torchvision_cpu_shim  # noqa: F401  (tests import it from here)


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
