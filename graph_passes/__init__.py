"""Pure ONNX -> ONNX passes. Each returns a new, checked model and never edits its input.

canonicalize (+ fuse_affine) brings an export to the canonical op set; expose_tensors and append_target_seed
add outputs and the in-graph target; vjp/ appends reverse-mode subgraphs from per-op rules; lrp/ compiles LRP
rules (data) into such subgraphs; tsgb and randomize are the method-specific passes.
"""

from . import lrp, vjp
from ._graph import GraphPassError, summarize_nodes
from .canonicalize import CanonicalizeReport, canonicalize
from .expose import expose_tensors
from .fuse_affine import fold_scale_shift, matmul_add_to_gemm, merge_bias_add
from .targets import RESOLVED, SEED, TARGET_SCORE, TARGETS_INPUT, append_target_seed
from .vjp import UnsupportedOpsError, append_vjp, grad_name, supported_ops

__all__ = ["GraphPassError", "summarize_nodes", "CanonicalizeReport", "canonicalize", "expose_tensors",
           "append_target_seed",
           "append_vjp", "grad_name", "supported_ops", "UnsupportedOpsError", "vjp", "lrp",
           "TARGETS_INPUT", "SEED", "RESOLVED", "TARGET_SCORE", "merge_bias_add", "fold_scale_shift",
           "matmul_add_to_gemm"]
