"""One exception type for every user-facing failure.

The CLI prints ``str(err)`` as a single line and exits non-zero, so messages must name the file, node or
option at fault and must not span lines.
"""


class SaliencyError(Exception):
    """A problem with the user's input (model, image, option) that we can explain in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UnsupportedModelError(SaliencyError):
    """The model uses ops or structures we cannot differentiate or propagate through."""


class ModelLoadError(UnsupportedModelError):
    """onnxruntime cannot load the model itself: every method would fail alike, so a run stops at once."""


class NumericalError(SaliencyError):
    """NaN/Inf appeared in inputs, activations, gradients or relevance."""
