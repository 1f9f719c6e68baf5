"""Seed 5 (Fahim et al., Sensors 2022): Grad-CAM aggregation rectified by a global guidance map."""

from __future__ import annotations

import numpy as np

from ..errors import SaliencyError
from .base import Request, Result
from .cam import CAMMethod
from .options import Option

PROVISIONAL = ("guidance-cam: formula reconstructed from the paper's abstract (no official code, equations of "
               "its section 3.2 not retrieved); provisional, see methods-spec section 5.2")
VARIANTS = ("global", "per-channel")


class GuidanceCAM(CAMMethod):
    """Guidance-rectified CAM: ReLU(sum_k alpha_k A_k) * ReLU(sum_k A_k g_k), alpha_k = GAP(g_k) (Grad-CAM).

    The guidance map G = ReLU(sum_k A_k g_k) (HiResCAM's map) rectifies the weighted aggregation:
    ReLU(sum_k alpha_k A_k G) = ReLU(sum_k alpha_k A_k) G since G >= 0. Option variant=per-channel
    rectifies each channel instead: ReLU(sum_k alpha_k ReLU(A_k g_k)). The formula is reconstructed from
    the abstract (methods-spec section 5.2); every result carries a note saying so.
    """

    name = "guidance-cam"
    options = (Option("variant", "choice", "global", "global: rectify the aggregation by the guidance map; "
                      "per-channel: rectify each channel", choices=VARIANTS),
               Option("reference", "bool", False, "refused: no reference code exists (methods-spec 5.2)"))

    def layer_map(self, A, G, req, out, layer):
        variant = self._variant(req)
        alpha = G.mean(axis=(2, 3))
        if variant == "per-channel":
            return np.einsum("nk,nkhw->nhw", alpha, np.maximum(A * G, 0))
        guidance = np.maximum((A * G).sum(axis=1), 0)
        return np.maximum(np.einsum("nk,nkhw->nhw", alpha, A), 0) * guidance

    def _variant(self, req: Request) -> str:
        variant = str(req.option("variant", "global"))
        if variant not in VARIANTS:
            raise SaliencyError(f"--option variant={variant!r}: guidance-cam variants are {', '.join(VARIANTS)}")
        return variant

    def explain(self, req: Request) -> Result:
        if str(req.option("reference", "false")).lower() not in ("false", "0"):
            raise SaliencyError("--option reference: guidance-cam has no reference code to reproduce (the authors "
                                "published none; the formula is reconstructed from the abstract, methods-spec 5.2)")
        variant = self._variant(req)  # a bad variant fails before any onnxruntime work
        result = super().explain(req)
        result.options["variant"] = variant
        result.notes.append(PROVISIONAL)
        return result
