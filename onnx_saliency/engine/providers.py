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


# onnxruntime pre-packs the constant operand of every MatMul/Gemm (and some Conv) kernel into its own buffer,
# once per use: a fully connected weight the backward pass reads transposed is packed twice, beside the
# model's weights that stay mapped. On VGG-16 that was 1 GiB more per Grad-CAM session (2.1 GiB peak against
# 0.73 GiB without) and 1.4 GiB more for LRP, for 0-5 % per call (benchmarks/results_coldstart.md).
DISABLE_PREPACKING = "session.disable_prepacking"


def session_options(threads: int | None = None, optimized: bool = True):
    """SessionOptions for every session this package builds: weights used where they lie (no pre-packed
    copies), onnxruntime's log as quiet as ours, and `threads` intra-op threads when given; optimized=False:
    graph optimisation off (a one-off session, or a graph optimised when it was saved)."""
    from ..ort_logging import session_severity

    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.add_session_config_entry(DISABLE_PREPACKING, "1")
    opts.log_severity_level = session_severity()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise SaliencyError("onnxruntime is not installed: pip install 'onnx-saliency[cpu]' "
                            "(or [gpu] for onnxruntime-gpu)") from err
    quiet_onnxruntime()
    return ort
