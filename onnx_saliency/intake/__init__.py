"""Model intake: read and validate an ONNX file (external data included), canonicalise it and find its image
input and class scores (model); candidate layers (layers); image decoding and preprocessing presets
(preprocess); class names (labels)."""

from .labels import load_labels
from .layers import Layer, auto_layer, candidate_layers, resolve_layer
from .model import LoadedModel, load_model, read_model
from .preprocess import PRESETS, Preprocessing, input_bounds, load_image, prepare

__all__ = ["LoadedModel", "load_model", "read_model", "Layer", "candidate_layers", "resolve_layer", "auto_layer",
           "Preprocessing", "PRESETS", "input_bounds", "load_image", "prepare", "load_labels"]
