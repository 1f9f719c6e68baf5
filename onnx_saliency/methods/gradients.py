"""Pixel-space gradient methods: vanilla gradient, gradient x input, guided backprop, guided Grad-CAM,
SmoothGrad and Integrated Gradients. Attributions are kept as (N, C, H, W); maps reduce the channels."""

from __future__ import annotations

import numpy as np

from graph_passes import grad_name

from ..errors import SaliencyError
from .base import Method, Request, Result
from .options import Option
from .cam import GradCAM


def _input_gradient(req: Request, x: np.ndarray, targets: np.ndarray, rules: str = "plain") -> dict:
    inp = req.engine.model.input_name
    return req.engine.run(x, targets, wrt=[inp], rules=rules, batch_size=req.batch_size)


def _abs_max(attr):
    return np.abs(attr).max(axis=1).astype(np.float32)


class PixelMethod(Method):
    uses_layer = False
    rules = "plain"
    signed = False

    def attributions(self, grad, x):
        return grad

    def reduce(self, attr):
        return _abs_max(attr)

    def explain(self, req: Request) -> Result:
        out = _input_gradient(req, req.x, req.targets, self.rules)
        attr = self.attributions(out[grad_name(req.engine.model.input_name)], req.x)
        return Result(self.name, self.reduce(attr), out["target_class"], out["target_score"],
                      attributions=attr.astype(np.float32), signed=self.signed)


class VanillaGradient(PixelMethod):
    """Simonyan et al.: |dy/dx|, max over channels."""

    name = "gradient"


class GradientXInput(PixelMethod):
    """x * dy/dx summed over channels (signed)."""

    name = "gradient-x-input"
    signed = True

    def attributions(self, grad, x):
        return grad * x

    def reduce(self, attr):
        return attr.sum(axis=1).astype(np.float32)


class GuidedBackprop(PixelMethod):
    """Springenberg et al.: ReLU backward passes only positive gradients at positive inputs; max |.| over channels."""

    name = "guided-backprop"
    rules = "guided"


class GuidedGradCAM(Method):
    """Guided backprop times the upsampled Grad-CAM map, per channel."""

    name = "guided-gradcam"

    def explain(self, req: Request) -> Result:
        cam = GradCAM().explain(req)
        gbp = GuidedBackprop().explain(Request(req.engine, req.x, cam.targets, [], req.options, req.batch_size))
        attr = gbp.attributions * cam.maps[:, None]
        return Result(self.name, _abs_max(attr), cam.targets, cam.scores, layers=cam.layers,
                      raw=cam.raw, attributions=attr)


def _resolved_targets(req: Request) -> tuple[np.ndarray, np.ndarray]:
    """Resolve top-1 targets once on the clean input, so noisy or scaled copies explain the same class."""
    out = req.engine.run(req.x, req.targets, batch_size=req.batch_size,
                         outputs=["target_class", "target_score"])
    return out["target_class"], out["target_score"]


class SmoothGrad(Method):
    """Mean input gradient over `n` noisy copies, noise sd = noise_level * (max - min) of each image.

    `noise` (an (n, N, C, H, W) array) may be given instead, for reproducible comparisons.
    """

    name = "smoothgrad"
    uses_layer = False
    options = (Option("n", "int", 20, "noisy copies per image", low=1, high=10000),
               Option("noise_level", "float", 0.1, "noise sd as a fraction of each image's value range", low=0.0,
                      high=100.0),
               Option("seed", "int", 0, "seed of the noise", low=0, high=2 ** 32 - 1),
               Option("noise", "array", None, "(n, N, C, H, W) noise to add instead of drawing it (API only)"))

    def explain(self, req: Request) -> Result:
        targets, scores = _resolved_targets(req)
        n = int(req.option("n", 20))
        level = float(req.option("noise_level", 0.1))
        noise = req.options.get("noise")
        if noise is None:
            rng = np.random.default_rng(int(req.option("seed", 0)))
            span = (req.x.max(axis=(1, 2, 3)) - req.x.min(axis=(1, 2, 3)))[:, None, None, None]
            noise = rng.standard_normal((n,) + req.x.shape).astype(np.float32) * (level * span)
        noise = np.asarray(noise, np.float32)
        if noise.shape[1:] != req.x.shape:
            raise SaliencyError(f"smoothgrad noise has shape {noise.shape}, expected (n,) + {req.x.shape}")
        n = len(noise)
        # all noisy copies of all images go through the graph as one big batch
        noisy = (req.x[None] + noise).reshape((-1,) + req.x.shape[1:])
        grads = _input_gradient(req, noisy, np.tile(targets, n))[grad_name(req.engine.model.input_name)]
        attr = grads.reshape((n,) + req.x.shape).mean(axis=0)
        return Result(self.name, _abs_max(attr), targets, scores, attributions=attr.astype(np.float32),
                      options={"n": n, "noise_level": level})


class IntegratedGradients(Method):
    """(x - baseline) * mean of gradients at baseline + k/m (x - baseline), k = 1..m (right Riemann sum)."""

    name = "integrated-gradients"
    uses_layer = False
    options = (Option("steps", "int", 20, "Riemann steps from the baseline to the input", low=1, high=10000),
               Option("baseline", "float-or-array", 0.0, "the path's start: a value, or (API) an array "
                      "broadcastable to the input batch"))

    def explain(self, req: Request) -> Result:
        targets, scores = _resolved_targets(req)
        m = int(req.option("steps", 20))
        try:
            baseline = np.broadcast_to(np.asarray(req.option("baseline", 0.0), np.float32), req.x.shape)
        except ValueError:
            raise SaliencyError(f"--option baseline: an array of shape {np.shape(req.option('baseline'))} does "
                                f"not broadcast to the input batch {req.x.shape}") from None
        alphas = (np.arange(1, m + 1, dtype=np.float32) / m)[:, None, None, None, None]
        path = (baseline[None] + alphas * (req.x - baseline)[None]).reshape((-1,) + req.x.shape[1:])
        grads = _input_gradient(req, path, np.tile(targets, m))[grad_name(req.engine.model.input_name)]
        attr = (req.x - baseline) * grads.reshape((m,) + req.x.shape).mean(axis=0)
        return Result(self.name, attr.sum(axis=1).astype(np.float32), targets, scores,
                      attributions=attr.astype(np.float32), signed=True, options={"steps": m})


GRADIENT_METHODS = [VanillaGradient, GradientXInput, GuidedBackprop, GuidedGradCAM, SmoothGrad, IntegratedGradients]
