"""`onnx-saliency compare`: one image, several methods, one PNG grid to look at."""

from __future__ import annotations

from pathlib import Path

import click

from onnx_saliency.errors import SaliencyError

from .common import (explainer_from_options, fail_cleanly, method_options, parse_target, progress, quiet_option,
                     rendering_from_options, rendering_options,
                     speak_up, split_model_and_images, with_model_options)


def _panel(rgb, height: int):
    """Scale a panel to `height` rows: 16-px model inputs would otherwise be unreadable next to their titles."""
    import cv2

    h, w = rgb.shape[:2]
    if h == height:
        return rgb
    width = max(1, round(w * height / h))
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_NEAREST if height > h else cv2.INTER_AREA)


MAX_PANEL = 4096


@click.command()
@click.argument("inputs", nargs=-1)
@click.option("-m", "--method", "methods", multiple=True, default=("gradcam",), show_default=True,
              help="Method (repeatable), e.g. -m gradcam -m relevance-cam -m cmwp+ge.")
@click.option("--layer", "layers", multiple=True, help="Layer tensor/node name or index (repeatable; default auto).")
@click.option("--target", default=None, help="top1 (default), a class index or a label.")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), default="compare.png", show_default=True)
@click.option("--size", type=int, default=224, show_default=True, help="Height of each panel in pixels (8..4096).")
@click.option("--cols", type=int, default=None, help="Panels per row (default: all in one row).")
@click.option("--option", "option_pairs", multiple=True, help="Method option KEY=VALUE, passed to every method.")
@rendering_options
@quiet_option
@with_model_options
@fail_cleanly
def compare(inputs, methods, layers, target, out_path, size, cols, option_pairs, clip_percentile, blend, quiet,
            **model_kw):
    """[MODEL] IMAGE: the image and every requested method's overlay side by side in one PNG.

    CAMs are overlaid on the photo; signed pixel maps (LRP, gradient x input, TSGB, IG) are diverging heatmaps
    (red +, blue -, white 0) and unsigned pixel maps sequential ones, each with its colour bar. A method that
    fails is reported (one `error:` line) and left out; the others are drawn and the exit status is 1."""
    from onnx_saliency.methods import get_method
    from onnx_saliency.output.postprocess import grid, render, titled, with_colour_bar
    from onnx_saliency.intake.preprocess import load_image
    from onnx_saliency.output.sidecar import result_kind
    from onnx_saliency.output.batch import PartialFailure, method_error
    from onnx_saliency.output.writers import write_png

    rendering = rendering_from_options(clip_percentile, blend)
    if not 8 <= size <= MAX_PANEL:  # a typo such as 100000 would ask for a canvas of tens of GB
        raise SaliencyError(f"--size {size}: panels need from 8 to {MAX_PANEL} pixels")
    if cols is not None and not 1 <= cols <= 64:
        raise SaliencyError(f"--cols {cols}: must be from 1 to 64")
    model, images = split_model_and_images(inputs)
    if len(images) != 1:
        raise SaliencyError(f"compare takes one image, got {len(images)}; use `explain` for several")
    method_objs = [get_method(m) for m in methods]  # unknown methods fail before any work
    options = method_options(option_pairs, method_objs)
    ex = explainer_from_options(model, **model_kw)
    speak_up(ex, inputs, model, quiet)
    layer_spec = list(layers) if layers else ["auto"]
    for spec in layer_spec:
        ex.resolve_layer(spec)
    picture_in = load_image(images[0])
    display = ex.prepare([picture_in])[1][0]
    targets = ex.targets(parse_target(target), 1)
    panels, titles, failed = [], [], []
    with progress(len(method_objs), "comparing", quiet) as bar:
        for spelled, m in zip(methods, method_objs):
            try:
                result = ex.explain([picture_in], method=m.name,
                                    layer=layer_spec if len(layer_spec) > 1 else layer_spec[0], target=targets,
                                    **{k: v for k, v in options.items() if k in ex.options_of(m.name, options)})
            except Exception as err:  # noqa: BLE001 - one method's failure must not cost the other panels
                failed.append(spelled)
                reason = method_error(err)
                where = f"{images[0]}: " + ("" if reason.startswith(f"-m {m.name}:") else f"-m {spelled}: ")
                bar.echo(f"error: {where}{reason}")
                bar.update(1)
                continue
            t = int(result.targets[0])
            heat, scale = render(result.maps[0], result_kind(result), display, blend=rendering.blend,
                                 clip_percentile=rendering.clip_percentile)
            panels.append(titled(with_colour_bar(_panel(heat, size), scale), [scale.caption]))
            titles.append(f"{spelled}: {ex.model.label(t)} {float(result.scores[0]):.3g}")
            bar.update(1)
    if panels:
        panels.insert(0, _panel(display, size))
        titles.insert(0, Path(images[0]).name)
        canvas = grid(panels, titles, cols=cols or len(panels))
        write_png(out_path, canvas)
        lost = f"; {', '.join(failed)} failed" if failed else ""
        click.echo(f"wrote {out_path} ({len(panels) - 1} method(s), layer {', '.join(layer_spec)}{lost})")
    if failed:
        raise PartialFailure(f"{len(failed)} of {len(methods)} method(s) failed: {', '.join(failed)}"
                             + ("" if panels else "; nothing written"))


