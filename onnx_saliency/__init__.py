"""onnx-saliency: saliency maps for image classifiers from the exported ONNX file alone.

The front door is :class:`Explainer`. The rooms: intake (model files, layers, preprocessing), engine
(onnxruntime sessions), methods, lrp, evaluation, audit, output, export; graph rewrites live in the separate
package graph_passes. Names are loaded on first use, so ``import onnx_saliency`` costs almost nothing.
"""

__version__ = "0.1.0"

_LAZY = {"Explainer": ".explainer", "SaliencyError": ".errors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Explainer", "SaliencyError", "__version__"]
