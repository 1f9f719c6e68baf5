"""The engine: one onnxruntime session per rewritten graph (session), batches sized to a memory budget
(memory), the NaN/Inf guard (numerics), the execution providers (providers), the persistent cache (cache,
optimized). Names load on first use: the command line reads engine.cache before onnx and onnxruntime are
imported (onnx_saliency.prehash)."""

from .. import lazy_names

_LAZY = {"Engine": ".session", "RULE_SETS": ".session", "DEFAULT_MEMORY_BUDGET": ".memory",
         "activation_bytes": ".memory", "check_finite": ".numerics", "first_nonfinite_node": ".numerics",
         "import_onnxruntime": ".providers", "providers_for": ".providers"}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = list(_LAZY)
