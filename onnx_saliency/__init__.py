"""onnx-saliency: saliency maps for image classifiers from the exported ONNX file alone.

The front door is :class:`Explainer`. The rooms: intake (model files, layers, preprocessing), engine
(onnxruntime sessions), methods, lrp, evaluation, audit, output, export; graph rewrites live in the separate
package graph_passes. Names are loaded on first use, so ``import onnx_saliency`` costs almost nothing.
"""

__version__ = "0.1.0"


def lazy_names(package: str, names: dict):
    """A module ``__getattr__`` for `package` that imports ``names[name]`` (a module relative to it) on first
    use of `name` and keeps the value in the package, so importing the package itself loads nothing."""
    import sys

    def __getattr__(name):
        if name in names:
            import importlib

            value = getattr(importlib.import_module(names[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


_LAZY = {"Explainer": ".explainer", "SaliencyError": ".errors"}
__getattr__ = lazy_names(__name__, _LAZY)


__all__ = ["Explainer", "SaliencyError", "__version__"]
