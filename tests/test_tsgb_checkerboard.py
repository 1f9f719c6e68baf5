"""Where the regular grid in TSGB maps of strided networks comes from (issue 19).

TSGB-Conv spreads R(o) = sum_k g_k(o) y_k(o) over each output's receptive field in proportion to |x|. A 3x3
convolution with stride 2 covers even input rows/columns with two receptive fields and odd ones with one, so an
input pixel receives 2 x 2 : 2 x 1 : 1 x 2 : 1 x 1 shares: a 4:2:2:1 pattern of period 2. The numpy reference
written from the authors' algorithm (tests/test_tsgb.py) has the same grid, value for value, and a stride-1 twin
of the network has none: the checkerboard is the method's own (the stride-2 overlap of its weight-free spread),
not an artefact of our graph, of up-sampling (the map is computed at input resolution) or of the display.
"""

import numpy as np
import onnx
from onnx import helper

from onnx_saliency import Explainer
from tests.graphs import make_model
from tests.test_tsgb import conv_np, tsgb_conv_np, tsgb_fc_np

SIZE, CLASSES = 32, 3


def checkerboard_energy(m: np.ndarray) -> float:
    """Variance of the four 2x2 phase means of |m|, relative to their mean squared: 0 for a map without a
    period-2 grid; 4:2:2:1 phases give 19/81 = 0.235."""
    a = np.abs(np.asarray(m, np.float64))
    phases = np.array([a[i::2, j::2].mean() for i in range(2) for j in range(2)])
    return float(phases.var() / phases.mean() ** 2)


def _params(seed=3):
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((6, 3, 3, 3)) * 0.4).astype(np.float32),
            "b1": (rng.standard_normal(6) * 0.05).astype(np.float32),
            "fc": rng.standard_normal((CLASSES, 6)).astype(np.float32),
            "fcb": np.zeros(CLASSES, np.float32)}


def _model(path, stride, p):
    """conv 3x3 (stride `stride`, pad 1) -> relu -> GAP -> flatten -> gemm: the stem of a strided CNN."""
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[stride, stride],
                              name="stem"),
             helper.make_node("Relu", ["c1"], ["a1"], name="relu"),
             helper.make_node("GlobalAveragePool", ["a1"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc")]
    model = make_model(nodes, [("input", (None, 3, SIZE, SIZE))], [("logits", (None, CLASSES))], p)
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnx_saliency.preset", value="raw"))
    onnx.save(model, path)
    return path


def _photo():
    """A smooth positive image (no texture of its own at period 2)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    return np.stack([0.5 + 0.4 * np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in range(3)])[None].astype(np.float32)


def _reference(x, p, stride, target):
    x64 = x.astype(np.float64)
    c1 = conv_np(x64, p["w1"].astype(np.float64), p["b1"].astype(np.float64), stride=stride, pad=1)
    a1 = np.maximum(c1, 0)
    flat = a1.mean(axis=(2, 3))
    g_flat = tsgb_fc_np(flat, p["fc"].astype(np.float64), np.array([target]))
    g_c1 = np.broadcast_to(g_flat[:, :, None, None] / (a1.shape[2] * a1.shape[3]), a1.shape) * (c1 > 0)
    return (x64 * tsgb_conv_np(x64, c1, g_c1, k=3, stride=stride, pad=1)).sum(1)[0]


def test_stride_two_overlap_makes_the_tsgb_checkerboard_and_the_reference_has_it_too(tmp_path):
    p, x = _params(), _photo()
    maps = {}
    for stride in (1, 2):
        r = Explainer(_model(tmp_path / f"s{stride}.onnx", stride, p)).explain(x, method="tsgb", target=[0])
        ref = _reference(x, p, stride, 0)
        np.testing.assert_allclose(r.maps[0], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())  # ours = theirs
        maps[stride] = r.maps[0]
    inner = (slice(2, -2), slice(2, -2))  # away from the zero padding's own border effect
    strided, plain = checkerboard_energy(maps[2][inner]), checkerboard_energy(maps[1][inner])
    assert strided > 0.15, strided  # the 4:2:2:1 overlap pattern (19/81 = 0.235 for a flat R/Z)
    assert plain < 0.01, plain      # stride 1: every pixel is in 3 x 3 receptive fields, no grid
    a = np.abs(maps[2][inner])
    phases = np.array([[a[i::2, j::2].mean() for j in range(2)] for i in range(2)])
    # the phase covered by 2 x 2 receptive fields holds about twice each 2 x 1 phase and four times the 1 x 1
    # one (the rows/columns with an odd index in the padded frame are the ones in two fields)
    ratios = np.sort(phases.ravel()) / phases.max()
    np.testing.assert_allclose(ratios, [0.25, 0.5, 0.5, 1.0], atol=0.08)


def test_checkerboard_energy_measures_a_period_two_grid():
    flat = np.ones((8, 8))
    grid = np.tile([[4.0, 2.0], [2.0, 1.0]], (4, 4))
    assert checkerboard_energy(flat) == 0.0
    assert abs(checkerboard_energy(grid) - 19 / 81) < 1e-12
    assert checkerboard_energy(np.tile([[1.0, 1.0], [1.0, 1.0]], (4, 4)) * np.arange(8)[:, None]) < 0.05  # a ramp
