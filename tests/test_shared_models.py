"""The real exported classifiers in ../shared: preprocessing, exact gradients, BN-folding invariance."""

import json

import numpy as np
import pytest

from onnx_saliency import Explainer

pytestmark = pytest.mark.shared

MODELS = {
    "squeezenet1_1": {},
    "efficientnet_lite0": {},
    "efficientnet_lite0_bn": {},
    "open_nsfw": {},
}


@pytest.fixture(scope="module")
def explainers(shared):
    labels = shared / "labels" / "imagenet_class_index.json"
    out = {}
    for name in MODELS:
        out[name] = Explainer(shared / "models" / f"{name}.onnx", threads=2,
                              labels=None if name == "open_nsfw" else labels)
    return out


def _val_images(shared):
    ann = json.loads((shared / "images" / "imagenet_val" / "annotations.json").read_text())["images"]
    return [(shared / "images" / "imagenet_val" / f, v["class_index"]) for f, v in sorted(ann.items())]


@pytest.mark.parametrize("name,min_top1,min_top5", [("squeezenet1_1", 5, 8), ("efficientnet_lite0", 9, 10),
                                                     ("efficientnet_lite0_bn", 9, 10)])
def test_imagenet_models_classify_val_photos(explainers, shared, name, min_top1, min_top5):
    """The manifest's preprocessing reproduces the shared README's accuracy (resize 256, crop 224)."""
    images = _val_images(shared)
    logits = explainers[name].predict([p for p, _ in images])
    truth = np.array([c for _, c in images])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert (top5[:, 0] == truth).sum() >= min_top1
    assert (top5 == truth[:, None]).any(axis=1).sum() >= min_top5


def test_photos_known_predictions(explainers, shared):
    ex = explainers["efficientnet_lite0"]
    r = ex.explain([shared / "images" / "skimage" / "coffee.png", shared / "images" / "darknet" / "eagle.jpg"])
    assert [ex.model.label(int(t)) for t in r.targets] == ["espresso", "kite"]
    sq = explainers["squeezenet1_1"]
    assert sq.model.label(int(sq.explain(shared / "images" / "imagenet_val" / "ILSVRC2012_val_00039905.jpg").targets[0])) == "tench"


def test_open_nsfw_nhwc_softmax_model(explainers, shared):
    ex = explainers["open_nsfw"]
    assert ex.model.layout == "NHWC" and ex.model.score_tensor != ex.model.output_name
    images = [shared / "images" / "skimage" / n for n in ("chelsea.png", "astronaut.png")]
    probs = ex.engine.forward(ex.prepare(images)[0])
    sfw = np.exp(probs[ex.model.score_tensor])
    sfw = sfw[:, 0] / sfw.sum(axis=1)
    assert (sfw > 0.9).all(), sfw
    r = ex.explain(images, method="gradcam")
    assert r.maps.shape == (2, 224, 224) and np.isfinite(r.maps).all() and np.ptp(r.maps) > 0
    # an NHWC float batch in the original layout is accepted as-is
    x, _ = ex.prepare(images)
    r2 = ex.explain(x.transpose(0, 2, 3, 1), method="gradcam")
    np.testing.assert_allclose(r2.maps, r.maps, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_input_gradient_matches_finite_differences(explainers, shared, name):
    """<dy/dx, v> equals (y(x + h v) - y(x - h v)) / 2h in float32 ORT.

    Directions mix the gradient with noise: a purely random direction in 150k dimensions is nearly orthogonal
    to the gradient, so its derivative drowns in float32 rounding. h = 0.002 keeps ReLU/Clip kink crossings rare.
    """
    from graph_passes import grad_name

    ex = explainers[name]
    x, _ = ex.prepare(shared / "images" / "darknet" / "eagle.jpg")
    out = ex.engine.run(x, wrt=[ex.model.input_name])
    g = out[grad_name(ex.model.input_name)].astype(np.float64)
    target = int(out["target_class"][0])
    rng = np.random.default_rng(0)
    h = 0.002
    for _ in range(3):
        v = g + 0.5 * np.linalg.norm(g) * rng.standard_normal(x.shape) / np.sqrt(x.size)
        v /= np.linalg.norm(v)
        pair = np.concatenate([x + h * v, x - h * v]).astype(np.float32)
        y = ex.engine.forward(pair)[ex.model.score_tensor][:, target].astype(np.float64)
        fd = (y[0] - y[1]) / (2 * h)
        analytic = float((g * v).sum())
        assert abs(fd - analytic) <= 0.01 * abs(analytic), (fd, analytic)


def test_bn_folded_and_unfolded_give_same_maps(explainers, shared):
    a, b = explainers["efficientnet_lite0"], explainers["efficientnet_lite0_bn"]
    assert len(b.model.report.folded_bn) == 49
    images = [shared / "images" / "darknet" / n for n in ("eagle.jpg", "dog.jpg")]
    for method in ("gradcam", "gradcam++", "layercam", "gradient"):
        ra, rb = a.explain(images, method=method), b.explain(images, method=method)
        assert (ra.targets == rb.targets).all()
        for i in range(len(images)):
            r = np.corrcoef(ra.maps[i].ravel(), rb.maps[i].ravel())[0, 1]
            assert r > 0.9999, (method, r)
            assert np.abs(ra.maps[i] - rb.maps[i]).max() < 1e-3 * max(1.0, np.abs(ra.maps[i]).max()), method
