"""The engine: one onnxruntime session per rewritten graph (session), batches sized to a memory budget
(memory), the NaN/Inf guard (numerics), the execution providers (providers), the persistent cache (cache,
optimized). Names load on first use: the command line reads engine.cache before onnx and onnxruntime are
imported (onnx_saliency.prehash)."""

_LAZY = {"Engine": ".session", "RULE_SETS": ".session", "DEFAULT_MEMORY_BUDGET": ".memory",
         "activation_bytes": ".memory", "check_finite": ".numerics", "first_nonfinite_node": ".numerics",
         "import_onnxruntime": ".providers", "providers_for": ".providers"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
