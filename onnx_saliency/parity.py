"""For users of the ``[parity]`` extra (the reference libraries the tests and benchmarks compare against):
importing torchvision next to a CPU build of torch.

``pip install -e ".[parity]"`` installs torch 2.13.0 and torchvision 0.28.0. On machines where torch is the
CPU build, the torchvision wheel from PyPI is still a CUDA build (its ``_C.so`` needs ``libc10_cuda.so``,
``libtorch_cuda.so`` and ``libcudart.so.13``) and PyPI has no CPU build of it (``torchvision==0.28.0+cpu``
does not resolve), so its C++ ops do not load and ``import torchvision`` dies registering fake kernels:
``RuntimeError: operator torchvision::nms does not exist``. pytorch-grad-cam, zennit and torchcam import
torchvision, so they die too.

Call :func:`install_torchvision_cpu_shim` before the first ``import torchvision`` (or of any library that
imports it), or use :func:`import_torchvision`. Where the C++ extension loads (a torchvision built for the
installed torch) it does nothing; otherwise it declares the two operator schemas the import needs. The
pure-Python parts then work (model definitions, transforms, what the reference libraries use); the C++ ops
themselves (``torchvision.ops.nms``, ``roi_align``, image decoding) stay unavailable. onnx-saliency itself
never imports torch: this module is only for scripts that use the reference libraries.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_lib = None  # the torch.library.Library holding the schemas; dropping it would unregister them


def _extension_loads(folder: str) -> bool:
    import torch

    for path in sorted(glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd"))):
        try:
            torch.ops.load_library(path)  # what torchvision's own import does first
        except (OSError, RuntimeError):
            return False
        return True
    return False


def install_torchvision_cpu_shim() -> bool:
    """Make ``import torchvision`` work with a CPU torch; True when the shim was needed (and is in place)."""
    global _lib
    if _lib is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or "torchvision" in sys.modules:
        return False  # not installed, or already imported (too late to help, or it worked)
    if _extension_loads(list(spec.submodule_search_locations)[0]):
        return False
    import torch

    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


def import_torchvision():
    """``import torchvision`` after :func:`install_torchvision_cpu_shim`; returns the module."""
    install_torchvision_cpu_shim()
    import torchvision

    return torchvision
