"""onnx-saliency: saliency maps for image classifiers from the exported ONNX file alone."""

__version__ = "0.1.0"

from .errors import SaliencyError  # noqa: E402
from .explainer import Explainer  # noqa: E402

__all__ = ["Explainer", "SaliencyError", "__version__"]
