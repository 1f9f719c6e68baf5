"""Pure ONNX -> ONNX passes. Each returns a new, checked model and never edits its input."""

from ._graph import GraphPassError
from .canonicalize import CanonicalizeReport, canonicalize
from .expose import expose_tensors
from .targets import RESOLVED, SEED, TARGET_SCORE, TARGETS_INPUT, append_target_seed
from .vjp import UnsupportedOpsError, append_vjp, grad_name, supported_ops
from . import vjp_rules
from . import lrp  # noqa: E402  LRP rules as data, append_lrp
from .fuse_affine import fold_scale_shift, matmul_add_to_gemm, merge_bias_add  # gp.fuse_affine stays the module

__all__ = ["GraphPassError", "CanonicalizeReport", "canonicalize", "expose_tensors", "append_target_seed",
           "append_vjp", "grad_name", "supported_ops", "UnsupportedOpsError", "vjp_rules",
           "TARGETS_INPUT", "SEED", "RESOLVED", "TARGET_SCORE", "merge_bias_add", "fold_scale_shift",
           "matmul_add_to_gemm"]
