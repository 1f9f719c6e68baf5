"""Context-aware saliency: the vectorised function against a loop-by-loop reference written from the spec
(methods-spec section 1, step C, with the documented grid and interpolation choices)."""

import math

import cv2
import numpy as np
import pytest

from onnx_saliency import SaliencyError
from onnx_saliency.methods.context_saliency import context_aware_saliency


def _resize(img, h, w):
    if img.shape[:2] == (h, w):
        return img
    mode = cv2.INTER_AREA if h * w < img.shape[0] * img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=mode).reshape((h, w) + img.shape[2:])


def _ceil(n, r):
    return max(1, math.ceil(n * r - 1e-9))


def _bilinear(values, rows, cols, src_shape, out_shape):
    """Pixel (i, j) of out_shape reads the grid of values at centres (rows, cols) of a src_shape image."""
    def coord(i, n_out, n_src, centres):
        u = (i + 0.5) * n_src / n_out - 0.5
        if u <= centres[0]:
            return 0, 0, 0.0
        if u >= centres[-1]:
            last = len(centres) - 1
            return last, last, 0.0
        for t in range(len(centres) - 1):
            if centres[t] <= u <= centres[t + 1]:
                return t, t + 1, (u - centres[t]) / (centres[t + 1] - centres[t])

    out = np.zeros(out_shape)
    for i in range(out_shape[0]):
        a0, a1, fa = coord(i, out_shape[0], src_shape[0], rows)
        for j in range(out_shape[1]):
            b0, b1, fb = coord(j, out_shape[1], src_shape[1], cols)
            out[i, j] = ((1 - fa) * ((1 - fb) * values[a0, b0] + fb * values[a0, b1])
                         + fa * ((1 - fb) * values[a1, b0] + fb * values[a1, b1]))
    return out


def reference_saliency(image, scales, sides, k, c, grid, threshold):
    """Brute force: every (query, candidate) pair compared with explicit loops, float64 throughout."""
    if image.ndim == 2:
        planes = image.astype(np.float64)[..., None]
    else:
        planes = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).astype(np.float64)
    for ch in range(planes.shape[2]):
        p = planes[..., ch]
        planes[..., ch] = (p - p.min()) / (p.max() - p.min() + np.finfo(np.float64).eps)
    planes = planes.astype(np.float32)
    h, w = planes.shape[:2]
    per_scale = []
    for r, side in zip(scales, sides):
        half = side // 2
        img = planes if r == 1 else _resize(planes, _ceil(h, r), _ceil(w, r))
        hr, wr = img.shape[:2]
        length = max(hr, wr)
        step = 1 if grid is None else max(half, math.ceil(length / grid))
        rows, cols = list(range(half, hr - half, step)), list(range(half, wr - half, step))
        cands = []  # (patch vector, x, y)
        for s in (1.0, 0.5, 0.25):
            if r * s < 0.2:
                break
            lvl = img if s == 1 else _resize(img, _ceil(hr, s), _ceil(wr, s))
            cstep = half if grid is None else step
            for ki in range(half, lvl.shape[0] - half, cstep):
                for li in range(half, lvl.shape[1] - half, cstep):
                    patch = lvl[ki - half:ki + half + 1, li - half:li + half + 1].astype(np.float64).ravel()
                    cands.append((patch, (li + 1) / (length * s), (ki + 1) / (length * s)))
        kk = min(k, len(cands))
        values = np.zeros((len(rows), len(cols)))
        for a, i in enumerate(rows):
            for b, j in enumerate(cols):
                q = img[i - half:i + half + 1, j - half:j + half + 1].astype(np.float64).ravel()
                qx, qy = (j + 1) / length, (i + 1) / length
                d = sorted(np.linalg.norm(q - p) / (1 + c * math.hypot(qx - x, qy - y)) for p, x, y in cands)
                values[a, b] = 1 - math.exp(-np.mean(d[:kk]) * (sides[0] / side) ** 2)
        per_scale.append(_bilinear(values, rows, cols, (hr, wr), (h, w)))
    sal = np.mean(per_scale, axis=0)
    attended = np.argwhere(sal > threshold * sal.max())
    dist = np.zeros_like(sal)
    for i in range(h):
        for j in range(w):
            dist[i, j] = np.sqrt(((attended - [i, j]) ** 2).sum(axis=1)).min()
    return sal * (1 - dist / dist.max()) if dist.max() > 0 else sal


def _smooth_noise(shape, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, shape).astype(np.float32)
    return np.clip(cv2.GaussianBlur(img, (5, 5), 1.5) * 1.5 - 60, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape,grid,k", [((24, 24, 3), 6, 64), ((20, 26, 3), 5, 7), ((16, 16), None, 5),
                                          ((18, 14, 3), None, 64)])
def test_vectorised_equals_brute_force(shape, grid, k):
    img = _smooth_noise(shape, seed=sum(shape))
    scales, sides = (1.0, 0.8, 0.5, 0.3), [7, 5, 3, 3]
    got = context_aware_saliency(img, k=k, working_size=None, grid=grid)
    want = reference_saliency(img, scales, sides, k, 3.0, grid, 0.8)
    assert got.shape == shape[:2] and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_working_size_resizes_there_and_back():
    img = _smooth_noise((30, 40, 3), seed=3)
    got = context_aware_saliency(img, working_size=20, grid=6, k=9)
    small = _resize(img, 15, 20)
    want = reference_saliency(small, (1.0, 0.8, 0.5, 0.3), [7, 5, 3, 3], 9, 3.0, 6, 0.8)
    np.testing.assert_allclose(got, np.clip(_resize(want.astype(np.float32), 30, 40), 0, 1), atol=2e-4)


@pytest.mark.parametrize("centre,working_size", [((60, 150), 250), ((150, 70), 100)])
def test_single_bright_blob_on_flat_background_peaks_on_the_blob(centre, working_size):
    img = np.full((200, 220, 3), (90, 110, 100), np.uint8)
    cv2.circle(img, centre[::-1], 14, (250, 240, 200), -1)
    sal = context_aware_saliency(img, working_size=working_size)
    peak = np.unravel_index(np.argmax(sal), sal.shape)
    assert np.hypot(peak[0] - centre[0], peak[1] - centre[1]) <= 20, peak
    assert sal.min() >= 0 and sal.max() <= 1
    far = np.ones(sal.shape, bool)
    far[max(0, centre[0] - 60):centre[0] + 60, max(0, centre[1] - 60):centre[1] + 60] = False
    assert sal[far].max() < 0.1 * sal.max()


def test_flat_image_gives_zeros_and_bad_inputs_fail_cleanly():
    assert not context_aware_saliency(np.full((32, 32, 3), 7, np.uint8), working_size=None).any()
    with pytest.raises(SaliencyError, match="uint8"):
        context_aware_saliency(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(SaliencyError, match="attention_threshold"):
        context_aware_saliency(np.zeros((8, 8, 3), np.uint8), attention_threshold=1.0)
    with pytest.raises(SaliencyError, match="smaller than every patch"):
        context_aware_saliency(np.zeros((2, 2, 3), np.uint8), working_size=None)
