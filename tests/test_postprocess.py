import numpy as np
import pytest

from onnx_saliency.errors import SaliencyError
from onnx_saliency.output.postprocess import (
    colorize, colorize_signed, grid, minmax, overlay, resize_maps, scale_cam_image,
)


def test_minmax_per_image():
    maps = np.stack([np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[-4.0, 0.0], [0.0, 4.0]])]).astype(np.float32)
    out = minmax(maps)
    assert out.dtype == np.float32 and out.shape == (2, 2, 2)
    np.testing.assert_allclose(out[0], [[0, 0.25], [0.5, 1]], rtol=1e-6)
    np.testing.assert_allclose(out[1], [[0, 0.5], [0.5, 1]], rtol=1e-6)


def test_minmax_constant_map_is_zeros():
    maps = np.stack([np.full((3, 4), 7.5, np.float32), np.zeros((3, 4), np.float32), np.arange(12.0).reshape(3, 4)])
    out = minmax(maps)
    assert not np.isnan(out).any()
    assert (out[0] == 0).all() and (out[1] == 0).all() and out[2].max() == pytest.approx(1.0, abs=1e-6)


def test_resize_maps_shape_and_values():
    maps = np.stack([np.full((7, 7), 2.0), np.arange(49.0).reshape(7, 7)]).astype(np.float32)
    out = resize_maps(maps, (20, 30))  # (H, W)
    assert out.shape == (2, 20, 30) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 2.0)
    assert out[1, 0, 0] == pytest.approx(0.0) and out[1, -1, -1] == pytest.approx(48.0)
    # Values increase down and to the right, as in the source.
    assert (np.diff(out[1], axis=0) >= 0).all() and (np.diff(out[1], axis=1) >= 0).all()


def test_scale_cam_image_normalises_then_resizes():
    maps = np.stack([np.array([[0.0, 10.0], [10.0, 20.0]])]).astype(np.float32)
    out = scale_cam_image(maps, (4, 6))
    assert out.shape == (1, 4, 6) and out.dtype == np.float32
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(scale_cam_image(maps), minmax(maps))


def _install_shim():
    from onnx_saliency.parity import install_torchvision_cpu_shim

    install_torchvision_cpu_shim()


@pytest.mark.parity
def test_scale_cam_image_matches_pytorch_grad_cam():
    pytest.importorskip("torch")
    _install_shim()
    ref = pytest.importorskip("pytorch_grad_cam.utils.image")
    rng = np.random.default_rng(0)
    for dtype, (h, w), target in [(np.float32, (7, 7), (224, 224)), (np.float32, (14, 10), (300, 200)),
                                  (np.float64, (7, 9), (50, 70)), (np.float32, (5, 5), None)]:
        maps = (rng.standard_normal((3, h, w)) * 5 + 2).astype(dtype)
        maps[1] = 3.0  # constant map
        theirs = ref.scale_cam_image(maps.copy(), None if target is None else target[::-1])  # theirs: (W, H)
        ours = scale_cam_image(maps.copy(), target)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parity
def test_colorize_overlay_match_show_cam_on_image():
    pytest.importorskip("torch")
    _install_shim()
    ref = pytest.importorskip("pytorch_grad_cam.utils.image")
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    mask = rng.random((32, 48)).astype(np.float32)
    theirs = ref.show_cam_on_image(np.float32(img) / 255, mask, use_rgb=True)
    ours = overlay(img, colorize(mask, "jet"))
    np.testing.assert_array_equal(ours, theirs)


def test_colorize_jet_endpoints():
    m = np.array([[0.0, 1.0, 0.5, 2.0, -1.0, np.nan]], np.float32)
    rgb = colorize(m)
    assert rgb.shape == (1, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > 100 and rgb[0, 0, 0] == 0  # low end of jet is blue (RGB order)
    assert rgb[0, 1, 0] > 100 and rgb[0, 1, 2] == 0  # high end is red
    np.testing.assert_array_equal(rgb[0, 3], rgb[0, 1])  # clipped above
    np.testing.assert_array_equal(rgb[0, 4], rgb[0, 0])  # clipped below
    np.testing.assert_array_equal(rgb[0, 5], rgb[0, 0])  # NaN as 0
    gray = colorize(np.array([[0.0, 1.0]]), "gray")
    np.testing.assert_array_equal(gray[0], [[0, 0, 0], [255, 255, 255]])
    with pytest.raises(SaliencyError, match="unknown colormap 'rainbowz'"):
        colorize(m, "rainbowz")


def test_colorize_signed_is_symmetric():
    m = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    rgb = colorize_signed(m)
    np.testing.assert_array_equal(rgb[0], [[0, 0, 255], [128, 128, 255], [255, 255, 255],
                                           [255, 128, 128], [255, 0, 0]])
    # Scale is by max |value|: a map with small negative part keeps zero white and maps +4 to full red.
    rgb = colorize_signed(np.array([[-1.0, 0.0, 4.0]]))
    np.testing.assert_array_equal(rgb[0], [[191, 191, 255], [255, 255, 255], [255, 0, 0]])
    assert (colorize_signed(np.zeros((2, 2))) == 255).all()  # all white, no NaN


def test_overlay_formula():
    img = np.full((2, 2, 3), 100, np.uint8)
    heat = np.zeros((2, 2, 3), np.uint8)
    heat[0, 0] = (255, 0, 0)
    out = overlay(img, heat, alpha=0.5)
    # cam = 0.5*heat + 0.5*img, then divided by its max (0.5*(1+100/255)) and scaled to 255.
    peak = 0.5 + 0.5 * 100 / 255
    assert tuple(out[0, 0]) == (255, int(255 * 0.5 * 100 / 255 / peak), int(255 * 0.5 * 100 / 255 / peak))
    assert overlay(img, heat, alpha=0.0).max() == 255  # image only, renormalised to its max
    assert (overlay(np.zeros_like(img), np.zeros_like(img)) == 0).all()  # no NaN for all black
    with pytest.raises(SaliencyError, match="alpha"):
        overlay(img, heat, alpha=1.5)
    with pytest.raises(SaliencyError, match="differ in size"):
        overlay(img, heat[:1])


def test_grid_layout():
    a = np.full((20, 30, 3), 10, np.uint8)
    b = np.full((25, 20, 3), 200, np.uint8)
    c = np.full((20, 30, 3), 90, np.uint8)
    out = grid([a, b, c], ["gradcam", "a very long title that cannot possibly fit", "é"], cols=2)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    # Two columns of width 30 and a 4 px gap; two rows of (25 + title bar).
    assert out.shape[1] == 2 * 30 + 4
    row_h = (out.shape[0] - 4) // 2
    title_h = row_h - 25
    assert title_h > 10
    assert (out[title_h:title_h + 20, :30] == 10).all()
    assert (out[title_h:title_h + 25, 34:54] == 200).all()
    assert (out[row_h + 4 + title_h:row_h + 4 + title_h + 20, :30] == 90).all()
    assert (out[:title_h, :30] < 255).any()  # some title text drawn
    assert (out[row_h + 4:, 34:] == 255).all()  # empty cell stays white
    assert grid([a], ["x"]).shape == (20 + title_h, 30, 3)
    with pytest.raises(SaliencyError, match="2 images but 1 titles"):
        grid([a, b], ["x"])
    with pytest.raises(SaliencyError, match="no images"):
        grid([], [])


# --- rendering by kind ---------------------------------------------------------------------------------------
from onnx_saliency.output.postprocess import (  # noqa: E402
    figure, map_kind, render, upscale, with_colour_bar,
)


def test_map_kind_from_sign_and_pixel_attributions():
    assert map_kind(True, True) == "signed" and map_kind(False, True) == "pixel" and map_kind(False, False) == "cam"


def test_signed_render_is_symmetric_white_at_zero_and_clipped_at_the_percentile():
    m = np.zeros((10, 10))
    m[0, 0], m[0, 1], m[1, :] = 1000.0, -3.0, 1.0  # one outlier; |R| p90 = 1
    heat, scale = render(m, "signed", clip_percentile=90)
    assert scale.lo == -scale.hi and scale.hi == pytest.approx(1.0)
    assert (heat[5, 5] == 255).all()                       # zero is white
    assert tuple(heat[0, 0]) == (255, 0, 0)                # the outlier saturates at red, not the whole scale
    assert tuple(heat[1, 3]) == (255, 0, 0)                # R = p90 is full red too
    assert tuple(heat[0, 1]) == (0, 0, 255)                # negative beyond the clip: full blue
    assert "red +, blue -, white 0" in scale.caption and "p90" in scale.caption
    flipped, _ = render(-m, "signed", clip_percentile=90)  # sign flip swaps red and blue exactly
    np.testing.assert_array_equal(flipped[..., 0], heat[..., 2])


def test_signed_blend_shows_grey_photo_where_relevance_is_zero():
    photo = np.zeros((4, 4, 3), np.uint8)
    photo[..., 1] = 200  # green photo: grey copy has luminance ~117
    m = np.zeros((4, 4))
    m[0, 0] = 1.0
    heat, scale = render(m, "signed", photo, clip_percentile=100, blend=True)
    assert tuple(heat[0, 0]) == (255, 0, 0)
    grey = heat[3, 3]
    assert grey[0] == grey[1] == grey[2] and 100 < grey[0] < 135
    assert "grey" in scale.caption
    alone, _ = render(m, "signed", photo, clip_percentile=100)  # without blend the photo is not used
    assert (alone[3, 3] == 255).all()


def test_pixel_render_sequential_from_zero_and_cam_is_the_overlay():
    m = np.arange(16.0).reshape(4, 4)
    heat, scale = render(m, "pixel", clip_percentile=100)
    assert scale.lo == 0 and scale.hi == 15
    np.testing.assert_array_equal(heat[0, 0], scale.ramp[0])
    np.testing.assert_array_equal(heat[3, 3], scale.ramp[255])
    photo = np.full((4, 4, 3), 90, np.uint8)
    cam, cam_scale = render(m, "cam", photo)
    np.testing.assert_array_equal(cam, overlay(photo, colorize(minmax(m[None])[0])))
    assert (cam_scale.lo, cam_scale.hi) == (0, 15)
    with pytest.raises(SaliencyError, match="clip percentile"):
        render(m, "signed", clip_percentile=0)
    with pytest.raises(SaliencyError, match="unknown map kind"):
        render(m, "rainbow")


def test_figure_upscales_small_maps_and_adds_a_numbered_colour_bar():
    assert upscale(np.zeros((16, 20, 3), np.uint8), 224).shape == (224, 280, 3)  # 14x, pixels stay square
    assert upscale(np.zeros((300, 20, 3), np.uint8), 224).shape == (300, 20, 3)
    heat, scale = render(np.linspace(-1, 1, 256).reshape(16, 16), "signed", clip_percentile=100)
    barred = with_colour_bar(upscale(heat, 224), scale)
    assert barred.shape[0] == 224 and barred.shape[1] > 224 + 14
    bar_column = barred[:, 224 + 4 + 7]
    np.testing.assert_array_equal(bar_column[1:-1], scale.ramp[np.rint(np.linspace(255, 0, 224)).astype(int)][1:-1])
    assert bar_column[1][0] == 255 and bar_column[1][2] < 5 and bar_column[-2][2] == 255 and bar_column[-2][0] < 5
    assert (bar_column[112] > 250).all()  # white in the middle: 0
    fig = figure(heat, scale, "lrp: dog (207), score 12.5")
    assert fig.shape[0] == 224 + 2 * 22 and fig.shape[1] >= 224
    assert (fig[:44] < 128).any()  # the title and caption are drawn
