"""The CAM family: one small class per method, overriding how the layer map is computed from A and dY/dA.

Post-processing follows pytorch-grad-cam: per layer ReLU, per-image min-max, bilinear resize to the input;
the layers' mean (one layer: that map) is min-maxed again, as its aggregate_multi_layers does.
"""

from __future__ import annotations

import numpy as np

from graph_passes import grad_name
from graph_passes._graph import attrs, consumers, initializers, tensor_array

from ..errors import SaliencyError
from ..intake.layers import spatial_view
from ..output.postprocess import scale_cam_image
from .base import Method, Request, Result
from .options import Option


def bilinear_align_corners(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, K, h, w) -> (N, K, H, W) bilinear with align_corners=True (torch's UpsamplingBilinear2d)."""
    n, k, h, w = maps.shape
    H, W = size

    def axis(src, dst):
        pos = np.zeros(dst) if dst == 1 or src == 1 else np.arange(dst) * (src - 1) / (dst - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    top = maps[:, :, y0][..., x0] * (1 - fx) + maps[:, :, y0][..., x1] * fx
    bottom = maps[:, :, y1][..., x0] * (1 - fx) + maps[:, :, y1][..., x1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).astype(np.float32)


class CAMMethod(Method):
    """Base: run once with the layer exposed (and its gradient if `uses_gradients`), then combine."""

    uses_gradients = True

    def layer_map(self, A: np.ndarray, G: np.ndarray | None, req: Request, out: dict, layer: str) -> np.ndarray:
        weights = self.weights(A, G)
        return np.einsum("nk,nkhw->nhw", weights, A)

    def weights(self, A, G):  # pragma: no cover - interface
        raise NotImplementedError

    def explain(self, req: Request) -> Result:
        if not req.layers:
            raise SaliencyError(f"-m {self.name}: needs a layer (--layer)")
        wrt = req.layers if self.uses_gradients else ()
        out = req.engine.run(req.x, req.targets, expose=req.layers, wrt=wrt, batch_size=req.batch_size)
        per_layer, raws = [], []
        for layer in req.layers:
            A, G = out[layer], out[grad_name(layer)] if self.uses_gradients else None
            view = spatial_view(req.engine.model, layer)
            if view is not None:  # channels-last or transformer tokens: pytorch-grad-cam's reshape_transform
                A, G = view.to_nchw(A), None if G is None else view.to_nchw(G)
            if A.ndim != 4:
                raise SaliencyError(f"-m {self.name}: layer {layer!r} has shape {A.shape}, expected (N, C, h, w), "
                                    "(N, h, w, C) normalised over C, or (N, T, C) tokens after a patch embedding")
            cam = np.maximum(self.layer_map(A, G, req, out, layer), 0).astype(np.float32)
            raws.append(cam)
            per_layer.append(scale_cam_image(cam, req.size))
        # pytorch-grad-cam's aggregate_multi_layers: mean over layers, then min-max again, even for one layer
        maps = scale_cam_image(np.mean(per_layer, axis=0))
        return Result(self.name, maps.astype(np.float32), out["target_class"], out["target_score"],
                      layers=list(req.layers), raw=raws[-1] if len(raws) == 1 else None)


class GradCAM(CAMMethod):
    """Selvaraju et al.: alpha_k = spatial mean of dy/dA_k; ReLU(sum_k alpha_k A_k)."""

    name = "gradcam"

    def weights(self, A, G):
        return G.mean(axis=(2, 3))


class GradCAMPlusPlus(CAMMethod):
    """Chattopadhay et al.: positive gradients weighted by the closed-form alpha (pytorch-grad-cam, eps 1e-6)."""

    name = "gradcam++"

    def weights(self, A, G):
        g2, g3 = G ** 2, G ** 3
        sum_a = A.sum(axis=(2, 3))[:, :, None, None]
        aij = g2 / (2 * g2 + sum_a * g3 + 1e-6)
        aij = np.where(G != 0, aij, 0)
        return (np.maximum(G, 0) * aij).sum(axis=(2, 3))


class XGradCAM(CAMMethod):
    """Fu et al.: weights sum_ij (A / sum A) * g (eps 1e-7)."""

    name = "xgradcam"

    def weights(self, A, G):
        sum_a = A.sum(axis=(2, 3))[:, :, None, None]
        return (G * A / (sum_a + 1e-7)).sum(axis=(2, 3))


class LayerCAM(CAMMethod):
    """Jiang et al.: ReLU(sum_k ReLU(g_k) * A_k), element-wise weights; works at shallow layers."""

    name = "layercam"

    def layer_map(self, A, G, req, out, layer):
        return (np.maximum(G, 0) * A).sum(axis=1)


class HiResCAM(CAMMethod):
    """Draelos and Carin: sum_k g_k * A_k, element-wise, no spatial averaging of the gradient."""

    name = "hirescam"

    def layer_map(self, A, G, req, out, layer):
        return (G * A).sum(axis=1)


class GradCAMElementWise(CAMMethod):
    """sum_k ReLU(g_k * A_k) (pytorch-grad-cam GradCAMElementWise)."""

    name = "gradcam-elementwise"

    def layer_map(self, A, G, req, out, layer):
        return np.maximum(G * A, 0).sum(axis=1)


class EigenCAM(CAMMethod):
    """First principal component of the (centred) activations; no gradients, sign as the SVD returns it."""

    name = "eigencam"
    uses_gradients = False

    def layer_map(self, A, G, req, out, layer):
        maps = []
        for a in np.nan_to_num(A):
            flat = a.reshape(a.shape[0], -1).T
            flat = flat - flat.mean(axis=0)
            _, _, vt = np.linalg.svd(flat, full_matrices=False)
            maps.append((flat @ vt[0]).reshape(a.shape[1:]))
        return np.float32(maps)


class CAM(CAMMethod):
    """Zhou et al.: sum_k w_k^c A_k with w^c the classifier row; only for global-pool + linear heads."""

    name = "cam"
    uses_gradients = False

    def layer_map(self, A, G, req, out, layer):
        W = linear_head_weights(req.engine.model, layer)
        return np.einsum("nk,nkhw->nhw", W[out["target_class"]], A)


def linear_head_weights(model, layer: str) -> np.ndarray:
    """(classes, K) weights of a GAP -> [flatten] -> Gemm/MatMul [+ bias] head that starts at `layer`."""
    g = model.canonical.graph
    cons, inits = consumers(g), initializers(g)
    path_error = SaliencyError(f"-m cam: {layer!r} is not followed by global average pooling and one linear "
                               "layer; use gradcam (equal to CAM on such heads) or pick the last conv layer")
    t = layer
    nodes = cons.get(t, [])
    if len(nodes) != 1 or nodes[0].op_type not in ("GlobalAveragePool", "ReduceMean", "AveragePool"):
        raise path_error
    t = nodes[0].output[0]
    while True:
        nodes = cons.get(t, [])
        if len(nodes) != 1:
            raise path_error
        node = nodes[0]
        if node.op_type in ("Flatten", "Reshape", "Squeeze"):
            t = node.output[0]
            continue
        break
    if node.op_type == "Gemm" and node.input[1] in inits:
        w = tensor_array(inits[node.input[1]])
        return (w if attrs(node).get("transB", 0) else w.T) * attrs(node).get("alpha", 1.0)
    if node.op_type == "MatMul" and node.input[1] in inits:
        return tensor_array(inits[node.input[1]]).T
    raise path_error


class ScoreCAM(CAMMethod):
    """Channel weights from the scores of the input masked by each upsampled, normalised channel.

    variant "pgc" (default, pytorch-grad-cam): softmax over channels of the masked target logits.
    variant "official" (Wang et al. code): softmax probability of the target class for each masked input.
    The masked inputs go through the plain forward graph in chunks of `batch_size` channels, made one chunk
    at a time: memory stays at one chunk of masks and inputs (all upsampled masks of a 1280-channel layer for
    10 images at 224 px take 2.6 GB, twice over while normalising, and one image's masked inputs 0.8 GB).
    """

    name = "scorecam"
    uses_gradients = False
    options = (Option("variant", "choice", "pgc", "pgc: softmax over channels of the masked target logits "
                      "(pytorch-grad-cam); official: target probability of each masked input (Wang et al.)",
                      choices=("pgc", "official")),)

    def layer_map(self, A, G, req, out, layer):
        variant = req.option("variant", "pgc")
        if variant not in ("pgc", "official"):
            raise SaliencyError(f"--option variant={variant!r}: scorecam variants are 'pgc' and 'official'")
        n, k = A.shape[:2]
        targets = out["target_class"]
        weights = np.zeros((n, k), np.float32)
        engine, score = req.engine, req.engine.model.score_tensor
        chunk = max(1, req.batch_size)
        for i in range(n):
            parts = []
            for c0 in range(0, k, chunk):
                up = bilinear_align_corners(A[i:i + 1, c0:c0 + chunk], req.size)[0]  # (chunk, H, W)
                flat = up.reshape(len(up), -1)
                mins, maxs = flat.min(-1)[:, None, None], flat.max(-1)[:, None, None]
                masked = req.x[i][None] * ((up - mins) / (maxs - mins + 1e-8))[:, None]  # (chunk, C, H, W)
                parts.append(engine.run(masked, np.full(len(up), targets[i], np.int64), batch_size=chunk,
                                        outputs=[score])[score])
            logits = np.concatenate(parts)
            if variant == "pgc":
                s = logits[:, targets[i]]
                e = np.exp(s - s.max())
                weights[i] = e / e.sum()
            else:
                p = np.exp(logits - logits.max(1, keepdims=True))
                weights[i] = (p / p.sum(1, keepdims=True))[:, targets[i]]
        return np.einsum("nk,nkhw->nhw", weights, A)


CAM_METHODS = [CAM, GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, GradCAMElementWise, ScoreCAM, EigenCAM]
