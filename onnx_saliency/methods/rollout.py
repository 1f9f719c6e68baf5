"""Attention-based maps of vision transformers, from the Softmax outputs of the exported graph.

`rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): per block, the attention
probabilities fused over heads (mean by default; max / min as in common implementations), optionally the
lowest `discard_ratio` of each image's fused weights zeroed (never the class token's self-attention), the
residual added as the identity, A' = (A + I) / 2 renormalised over rows, and the product taken block by block:
R = A'_L ... A'_1. Class-agnostic: the target only names the reported score.

`gradient-rollout` (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability", the self-attention
rule): R = I, then per block R <- R + mean_heads((dy_t/dA * A)^+) R, with dy_t/dA the gradient of the target
score with respect to that block's attention probabilities (one backward pass, graph_passes.append_vjp).

The map is the class token's row (token 0) over the patch tokens, on the patch grid; prefix tokens
(class, distillation, register) are dropped. Swin's windowed attention is refused (see
intake.layers.attention_probabilities). Maps at input size: min-max, bilinear resize (scale_cam_image).
"""

from __future__ import annotations

import numpy as np

from graph_passes import grad_name

from ..intake.layers import Attention, attention_probabilities
from ..output.postprocess import scale_cam_image
from . import register
from .base import Method, Request, Result
from .options import Option

HEAD_FUSIONS = ("mean", "max", "min")


def _per_image(a: np.ndarray, n: int, tokens: int) -> np.ndarray:
    """(N*H, T, T) (torch's multi-head attention) or (N, H, T, T) -> (N, H, T, T); N major, as both lay it out."""
    return a.reshape(n, -1, tokens, tokens)


def rollout(attentions: list, head_fusion: str = "mean", discard_ratio: float = 0.0) -> np.ndarray:
    """(N, T, T) rollout of per-block (N, H, T, T) attention probabilities, in float64."""
    n, _, t, _ = attentions[0].shape
    eye = np.eye(t)
    result = np.broadcast_to(eye, (n, t, t)).copy()
    for a in attentions:
        a = np.asarray(a, np.float64)
        fused = {"mean": a.mean(axis=1), "max": a.max(axis=1), "min": a.min(axis=1)}[head_fusion]
        if discard_ratio > 0:
            flat = fused.reshape(n, -1).copy()
            k = int(flat.shape[1] * discard_ratio)
            for i in range(n):
                lowest = np.argsort(flat[i], kind="stable")[:k]
                flat[i, lowest[lowest != 0]] = 0  # the class token's attention to itself stays
            fused = flat.reshape(n, t, t)
        step = (fused + eye) / 2
        step = step / step.sum(axis=-1, keepdims=True)
        result = step @ result
    return result


def gradient_rollout(attentions: list, gradients: list) -> np.ndarray:
    """(N, T, T) Chefer et al. self-attention rule from per-block (N, H, T, T) attentions and their gradients."""
    n, _, t, _ = attentions[0].shape
    result = np.broadcast_to(np.eye(t), (n, t, t)).copy()
    for a, g in zip(attentions, gradients):
        cam = np.maximum(np.asarray(g, np.float64) * a, 0).mean(axis=1)
        result = result + cam @ result
    return result


class _AttentionMethod(Method):
    uses_layer = False
    explains_at = "attn"  # `onnx-saliency methods`: the attention blocks, neither a layer nor the pixels
    uses_gradients = False

    def relevance(self, attn: Attention, out: dict, req: Request) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def explain(self, req: Request) -> Result:
        attn = attention_probabilities(req.engine.model)
        wrt = attn.tensors if self.uses_gradients else ()
        out = req.engine.run(req.x, req.targets, expose=list(attn.tensors), wrt=list(wrt),
                             batch_size=req.batch_size)
        rel = self.relevance(attn, out, req)  # (N, T, T)
        h, w = attn.grid
        raw = np.float32(rel[:, 0, attn.prefix:].reshape(len(rel), h, w))
        maps = scale_cam_image(raw, req.size)
        return Result(self.name, maps, out["target_class"], out["target_score"], raw=raw,
                      options=self.options_used(req),
                      notes=[f"{len(attn.tensors)} attention blocks over {attn.prefix} prefix + {h}x{w} tokens"])

    def options_used(self, req: Request) -> dict:
        return {}


class AttentionRollout(_AttentionMethod):
    """Abnar & Zuidema attention rollout; options head_fusion (mean | max | min), discard_ratio in [0, 1)."""

    name = "rollout"
    options = (Option("head_fusion", "choice", "mean", "how the heads' attention is fused per block",
                      choices=HEAD_FUSIONS),
               Option("discard_ratio", "float", 0.0, "share of each image's lowest fused attention weights set to "
                      "0 per block (the class token's self-attention kept)", low=0.0, high=0.99))

    def options_used(self, req):
        return {"head_fusion": req.option("head_fusion"), "discard_ratio": req.option("discard_ratio")}

    def relevance(self, attn, out, req):
        opts = self.options_used(req)
        n = len(req.x)
        return rollout([_per_image(out[t], n, attn.tokens) for t in attn.tensors], opts["head_fusion"],
                       opts["discard_ratio"])


class GradientRollout(_AttentionMethod):
    """Chefer et al. 2021 gradient-weighted attention rollout (class-specific)."""

    name = "gradient-rollout"
    uses_gradients = True

    def relevance(self, attn, out, req):
        n = len(req.x)
        return gradient_rollout([_per_image(out[t], n, attn.tokens) for t in attn.tensors],
                                [_per_image(out[grad_name(t)], n, attn.tokens) for t in attn.tensors])


register(AttentionRollout, aliases=("attention-rollout",))
register(GradientRollout, aliases=("chefer", "generic-attention", "grad-rollout"))
