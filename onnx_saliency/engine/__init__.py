"""The engine: one onnxruntime session per rewritten graph (session), batches sized to a memory budget
(memory), the NaN/Inf guard (numerics) and the execution providers (providers)."""

from .memory import DEFAULT_MEMORY_BUDGET, activation_bytes
from .numerics import check_finite, first_nonfinite_node
from .providers import import_onnxruntime, providers_for
from .session import RULE_SETS, Engine

__all__ = ["Engine", "RULE_SETS", "DEFAULT_MEMORY_BUDGET", "activation_bytes", "check_finite",
           "first_nonfinite_node", "import_onnxruntime", "providers_for"]
