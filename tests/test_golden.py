"""Golden images: the pictures `explain` saves for a tiny built model, compared with reviewed PNGs in
tests/golden/. A rendering change fails here until the new pictures are looked at and stored:

    ONNX_SALIENCY_REGOLDEN=1 python -m pytest -q -p no:cacheprovider tests/test_golden.py

(rewrites tests/golden/*.png; review them with `git diff --stat` and an image viewer, then commit).

The tolerance absorbs float noise between onnxruntime builds (a map value a few ulps off can move a colour by
one level, or a colour-bar number in its last digit): at most 0.5 % of the pixels may differ by more than 24
levels in any channel, and the sizes must match exactly.
"""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from onnx_saliency.cli.main import main
from tests.graphs import tiny_classifier

GOLDEN = Path(__file__).parent / "golden"
# one method per kind of picture: CAM overlay, signed pixel heatmap (blended and not), unsigned pixel heatmap
CASES = {"gradcam": (), "gradient-x-input": (), "gradient": (), "integrated-gradients": ("--blend",)}
OPTIONS = {"integrated-gradients": ("--option", "steps=8")}
REGOLDEN = os.environ.get("ONNX_SALIENCY_REGOLDEN") == "1"


def _photo(path):
    """A smooth synthetic 16x16 photo: a bright disc on a gradient, the same on every platform."""
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32)
    disc = ((yy - 6) ** 2 + (xx - 9) ** 2 < 16).astype(np.float32)
    rgb = np.stack([40 + 10 * xx, 60 + 8 * yy, 200 * disc + 20], axis=-1)
    cv2.imwrite(str(path), np.clip(rgb, 0, 255).astype(np.uint8)[:, :, ::-1])
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    model = tiny_classifier(tmp / "tiny.onnx")
    photo = _photo(tmp / "photo.png")
    out = {}
    for method, flags in CASES.items():
        folder = tmp / method
        result = CliRunner().invoke(main, ["explain", str(model), str(photo), "-m", method, "--out", str(folder),
                                           *OPTIONS.get(method, ()), "-q", *flags], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out[method] = folder / "photo" / f"{method}.png"
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_saved_picture_matches_its_golden_image(rendered, method):
    new = cv2.imread(str(rendered[method]), cv2.IMREAD_COLOR)
    golden_path = GOLDEN / f"{method}{''.join(CASES[method]).replace('--', '-')}.png"
    if REGOLDEN:
        golden_path.write_bytes(rendered[method].read_bytes())
    if not golden_path.is_file():
        pytest.fail(f"no golden image {golden_path.name}; make it with ONNX_SALIENCY_REGOLDEN=1 (see the docstring)")
    golden = cv2.imread(str(golden_path), cv2.IMREAD_COLOR)
    assert new.shape == golden.shape, f"{method}: picture {new.shape} vs golden {golden.shape}"
    far = (np.abs(new.astype(int) - golden.astype(int)).max(axis=2) > 24).mean()
    assert far <= 0.005, f"{method}: {far:.2%} of the pixels differ from {golden_path.name} by more than 24 levels"


def test_golden_comparison_can_fail(rendered):
    """The tolerance is not so loose that another kind of picture would pass as this one."""
    a = cv2.imread(str(rendered["gradient-x-input"]), cv2.IMREAD_COLOR)
    b = cv2.imread(str(GOLDEN / "gradient.png"), cv2.IMREAD_COLOR)
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    far = (np.abs(a[:h, :w].astype(int) - b[:h, :w].astype(int)).max(axis=2) > 24).mean()
    assert far > 0.05


def test_sidecar_says_how_the_picture_was_drawn(rendered):
    meta = json.loads(rendered["integrated-gradients"].with_suffix(".json").read_text())
    pic = meta["picture"]
    assert pic["kind"] == "signed" and pic["blend"] is True and pic["clip_percentile"] == 99.5
    assert pic["min_height"] == 224
    assert pic["colour_bar"]["lo"] == -pic["colour_bar"]["hi"] < 0
    assert "red +, blue -, white 0" in pic["colour_bar"]["caption"]
