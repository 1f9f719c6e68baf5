"""Let torchvision import on a CPU torch build (copy of tests/torch_shim.py; see docs/stack-probe.md §3).

The PyPI torchvision wheel is a CUDA build: on torch+cpu its C++ ops do not load and `import torchvision`
dies registering fake kernels for torchvision::nms. Defining the two schemas first is enough for the model
builders. Call install_torchvision_cpu_shim() before the first `import torchvision`.
"""

_lib = None  # keep the Library alive: dropping it would unregister the definitions


def install_torchvision_cpu_shim() -> None:
    global _lib
    import torch

    if _lib is not None:
        return
    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        _lib = torch.library.Library("torchvision", "DEF")
        _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
