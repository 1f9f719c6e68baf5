"""onnxruntime, imported only when a session is needed, and the execution providers a run asks for."""

from __future__ import annotations

from ..errors import SaliencyError
from ..ort_logging import quiet_onnxruntime


def providers_for(provider: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise SaliencyError("--provider cuda: onnxruntime-gpu with CUDA is not installed "
                                "(pip install 'onnx-saliency[gpu]' instead of [cpu])")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise SaliencyError(f"--provider {provider!r}: expected 'cpu' or 'cuda'")


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise SaliencyError("onnxruntime is not installed: pip install 'onnx-saliency[cpu]' "
                            "(or [gpu] for onnxruntime-gpu)") from err
    quiet_onnxruntime()
    return ort
