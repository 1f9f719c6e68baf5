"""Sanity checks: the randomisation graph pass, the numpy Spearman/SSIM, and the cascade end to end."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graph_passes import GraphPassError
from graph_passes.randomize import CASCADE, parameter_layers, randomize_weights
from onnx_saliency import Explainer, SaliencyError
from onnx_saliency.evaluation.sanity import randomization_test, rankdata, spearman, ssim
from tests.graphs import make_model, session, tiny_classifier


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_randomize_replaces_only_the_chosen_layers_and_never_edits_its_input(tiny):
    model = onnx.load(str(tiny))
    before = model.SerializeToString()
    assert parameter_layers(model) == ["conv1", "conv2", "fc"]
    out = randomize_weights(model, ["conv2"], seed=3)
    assert model.SerializeToString() == before
    inits, orig = _inits(out), _inits(model)
    conv2 = next(n for n in out.graph.node if n.name == "conv2")
    assert conv2.input[1] != "w2" and conv2.input[2] != "b2"
    w = inits[conv2.input[1]]
    assert w.shape == orig["w2"].shape and not np.allclose(w, orig["w2"])
    assert w.std() == pytest.approx(orig["w2"].std(), rel=0.15)  # same scale
    assert np.array_equal(inits["w1"], orig["w1"]) and np.array_equal(inits["fc"], orig["fc"])
    assert "w2" not in inits  # the replaced tensors are dropped, not left unused
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    y0 = session(model).run(None, {"input": x})[0]
    y1 = session(out).run(None, {"input": x})[0]
    assert y1.shape == y0.shape and not np.allclose(y0, y1)


def test_cascade_steps_from_the_top_and_shared_values_across_modes(tiny):
    model = onnx.load(str(tiny))
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    y = session(model).run(None, {"input": x})[0]
    assert np.array_equal(session(randomize_weights(model, CASCADE, step=0)).run(None, {"input": x})[0], y)
    top1 = randomize_weights(model, CASCADE, step=1, seed=5)
    alone = randomize_weights(model, ["fc"], seed=5)
    assert np.array_equal(_inits(top1)["fc__randomized__fc"], _inits(alone)["fc__randomized__fc"])
    top2 = _inits(randomize_weights(model, CASCADE, step=2, seed=5))
    assert {"w2", "fc"}.isdisjoint(top2) and "w1" in top2
    other_seed = _inits(randomize_weights(model, ["fc"], seed=6))["fc__randomized__fc"]
    assert not np.array_equal(other_seed, _inits(alone)["fc__randomized__fc"])
    with pytest.raises(GraphPassError, match="'relu1' is not a layer with learned weights"):
        randomize_weights(model, ["relu1"])
    with pytest.raises(GraphPassError, match="step in 0..3"):
        randomize_weights(model, CASCADE, step=4)


def test_shared_initializer_is_duplicated_not_overwritten():
    w = np.random.default_rng(0).standard_normal((2, 2, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["a"], name="first"),
             helper.make_node("Conv", ["a", "w"], ["b"], name="second")]
    model = make_model(nodes, [("input", (None, 2, 3, 3))], [("b", (None, 2, 3, 3))], {"w": w})
    out = randomize_weights(model, ["second"])
    first, second = out.graph.node
    assert first.input[1] == "w" and second.input[1] == "w__randomized__second"
    assert np.array_equal(_inits(out)["w"], w)


def test_rankdata_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (3, 7, 9)).astype(float)  # many ties
    b = rng.standard_normal((3, 7, 9))
    assert np.allclose(rankdata(a.reshape(3, -1)), [stats.rankdata(r) for r in a.reshape(3, -1)])
    expected = [stats.spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(3)]
    assert np.allclose(spearman(a, b), expected)
    assert spearman(a[0], a[0]) == pytest.approx(1.0)
    assert spearman(a[0], -a[0]) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.zeros((4, 4)), b[0, :4, :4]))


def _skimage_ssim(a, b, data_range=1.0):
    """skimage.metrics.structural_similarity(gaussian_weights=True) written out with scipy.ndimage."""
    ndimage = pytest.importorskip("scipy.ndimage")
    f = lambda im: ndimage.gaussian_filter(im, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
    cov_norm = 121 / 120
    ux, uy = f(a), f(b)
    vx, vy = cov_norm * (f(a * a) - ux * ux), cov_norm * (f(b * b) - uy * uy)
    vxy = cov_norm * (f(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s[5:-5, 5:-5].mean()


def test_ssim_matches_the_skimage_definition():
    rng = np.random.default_rng(0)
    a = rng.random((20, 23))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(_skimage_ssim(a, b), abs=1e-12)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(np.stack([a, b]), np.stack([b, a])) == pytest.approx([ssim(a, b)] * 2)
    assert ssim(a, 1 - a) < 0
    with pytest.raises(SaliencyError, match="smaller than the 11x11 window"):
        ssim(a[:8, :8], a[:8, :8])


def test_randomization_test_on_the_tiny_classifier(tiny):
    ex = Explainer(tiny)
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    targets = ex.predict(x).argmax(1)
    r = randomization_test(ex.model, x, targets, "gradient", steps=[0, 1, 3])
    assert r.layers == ["fc", "conv2", "conv1"] and r.spearman.shape == (3, 2) and r.maps.shape == (3, 2, 16, 16)
    assert np.allclose(r.spearman[0], 1) and np.allclose(r.ssim[0], 1)  # step 0: nothing randomised
    assert (r.spearman[2] < 0.9).all()
    assert r.step_labels() == ["original", "top 1: fc", "top 3: conv1"]
    ind = randomization_test(ex.model, x, targets, "gradcam", [ex.resolve_layer("auto")], mode="independent")
    assert ind.steps == [0, 1, 2] and ind.ssim.shape == (3, 2)
    with pytest.raises(SaliencyError, match="resolved target"):
        randomization_test(ex.model, x, np.array([-1, 0]), "gradient")
    with pytest.raises(SaliencyError, match="step 3: expected 0..2"):
        randomization_test(ex.model, x, targets, "gradient", mode="independent", steps=[3])


@pytest.mark.shared
def test_randomising_all_weights_decorrelates_gradient_maps_on_squeezenet(shared):
    ex = Explainer(shared / "models" / "squeezenet1_1.onnx", threads=2)
    x, _ = ex.prepare([shared / "images" / "darknet" / "eagle.jpg", shared / "images" / "imagenet_val"
                       / "ILSVRC2012_val_00000091.JPEG", shared / "images" / "skimage" / "coffee.png"])
    targets = ex.predict(x).argmax(1)
    layers = len(parameter_layers(ex.model.canonical))
    r = randomization_test(ex.model, x, targets, "gradient", steps=[0, 1, layers], keep_maps=False)
    assert np.allclose(r.spearman[0], 1)
    rho_all = r.spearman[-1]
    # a fully random net can leave the explained class's last ReLU dead: a constant map has no ranks (NaN)
    defined = rho_all[np.isfinite(rho_all)]
    assert len(defined) >= 1 and np.abs(defined).max() < 0.5
    assert r.ssim[-1].max() < 0.4
    assert np.nanmean(r.spearman[1]) > np.nanmean(rho_all)  # cascading down lowers the correlation further
