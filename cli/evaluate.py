"""`onnx-saliency evaluate`: faithfulness, localization and sanity metrics for methods on images."""

from __future__ import annotations

from pathlib import Path

import click

from onnx_saliency.errors import SaliencyError

from .common import (explainer_from_options, fail_cleanly, method_options, parse_target, progress, quiet_option,
                     speak_up, split_model_and_images, with_model_options)



@click.command()
@click.argument("inputs", nargs=-1)
@click.option("-m", "--method", "methods", multiple=True, default=("gradcam",), show_default=True,
              help="Method (repeatable). See `onnx-saliency methods`.")
@click.option("--metric", "metrics", multiple=True,
              help="deletion, insertion, average-drop, increase-confidence (default: these four), pointing-game, "
                   "energy-pointing-game, localization (need --annotations), sanity-cascading, sanity-independent; "
                   "or 'all'. Repeatable.")
@click.option("--annotations", type=click.Path(), default=None,
              help="Boxes/masks per image (JSON; format in onnx_saliency/evaluation/annotations.py).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="evaluation_out", show_default=True)
@click.option("--layer", "layers", multiple=True, help="Layer for CAM methods (repeatable; default auto).")
@click.option("--target", default=None,
              help="top1 (default), gt (the annotated class), a class index or label, or a comma list per image.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per explanation batch.")
@click.option("--metric-batch-size", type=int, default=64, show_default=True,
              help="Perturbed images per onnxruntime call.")
@click.option("--step", type=int, default=224, show_default=True, help="Pixels changed per deletion/insertion step.")
@click.option("--deletion-baseline", type=click.Choice(["zero", "blur", "mean"]), default="zero", show_default=True)
@click.option("--insertion-baseline", type=click.Choice(["zero", "blur", "mean"]), default="blur", show_default=True)
@click.option("--ad-variant", type=click.Choice(["gradcam++", "relevance-cam"]), default="gradcam++",
              show_default=True, help="Average Drop / Increase in Confidence definition.")
@click.option("--tolerance", type=float, default=15.0, show_default=True, help="Pointing game tolerance (input px).")
@click.option("--threshold", type=float, default=0.15, show_default=True,
              help="Localization: share of the map's range to threshold at.")
@click.option("--sanity-steps", type=int, default=0, show_default=True,
              help="Randomisation steps per sanity check (0: every layer).")
@click.option("--sanity-images", type=int, default=None, help="Use only the first N images for sanity checks.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--option", "option_pairs", multiple=True, help="Method option KEY=VALUE (e.g. n=50, steps=32).")
@quiet_option
@with_model_options
@fail_cleanly
def evaluate(inputs, methods, metrics, annotations, out_dir, layers, target, batch_size, metric_batch_size, step,
             deletion_baseline, insertion_baseline, ad_variant, tolerance, threshold, sanity_steps, sanity_images,
             seed, option_pairs, quiet, **model_kw):
    """Score METHODS on IMAGES (files or folders) with MODEL (.onnx; default: the embedded shapes model).

    A method that fails is reported (`error:` lines naming the images and the method) and left out; the
    others are scored and written, and the exit status is 1."""
    from onnx_saliency.evaluation.annotations import load_annotations
    from onnx_saliency.evaluation.runner import DEFAULT_METRICS, LOCALIZATION_METRICS, METRICS, Settings, evaluate as run, \
        sanity_step_count, settings_lines
    from onnx_saliency.evaluation.output import format_table, write_evaluation
    from onnx_saliency.methods import get_method
    from onnx_saliency.models import DEFAULT_MODEL_PATH, DEFAULT_SAMPLES_DIR

    model, images = split_model_and_images(inputs)
    if annotations is None and model == DEFAULT_MODEL_PATH and all(p.parent == DEFAULT_SAMPLES_DIR for p in images):
        annotations = str(DEFAULT_SAMPLES_DIR / "annotations.json")
    chosen = list(dict.fromkeys(metrics)) or list(DEFAULT_METRICS) + (list(LOCALIZATION_METRICS) if annotations else [])
    if "all" in chosen:
        chosen = [m for m in METRICS if annotations or m not in LOCALIZATION_METRICS]
    for name in chosen:
        if name not in METRICS:
            raise SaliencyError(f"--metric {name!r}: unknown; known: {', '.join(METRICS)}, all")
    for label, value in (("--batch-size", batch_size), ("--metric-batch-size", metric_batch_size), ("--step", step)):
        if value < 1:
            raise SaliencyError(f"{label} {value}: must be at least 1")
    options = method_options(option_pairs, [get_method(m) for m in methods])  # unknown methods and
    # options fail before any work
    ann = load_annotations(annotations) if annotations is not None else None
    settings = Settings(step=step, deletion_baseline=deletion_baseline, insertion_baseline=insertion_baseline,
                        ad_variant=ad_variant, tolerance=tolerance, threshold=threshold, sanity_steps=sanity_steps,
                        sanity_images=sanity_images, seed=seed, batch_size=batch_size,
                        metric_batch_size=metric_batch_size, layers=list(layers) or ["auto"],
                        target=parse_target(target), options=options)
    ex = explainer_from_options(model, **model_kw)
    speak_up(ex, inputs, model, quiet)
    n_sanity = min(len(images), sanity_images if sanity_images is not None else len(images))
    total = len(images) * len(methods) + (sanity_step_count(ex, settings, chosen) * len(methods) if n_sanity else 0)
    with progress(total, "evaluating", quiet) as bar:
        result = run(ex, images, list(methods), chosen, ann, annotations, settings, progress=bar.update,
                     on_failure=lambda line: bar.echo(f"error: {line}"))
    click.echo(f"model {Path(model).name}, {len(images)} image(s), preprocessing preset={ex.preprocessing.preset} "
               f"resize={ex.preprocessing.resize} crop={ex.preprocessing.crop}")
    click.echo(format_table(result))
    for line in settings_lines(result):
        click.echo(f"  {line}")
    written = write_evaluation(result, Path(out_dir))
    click.echo(f"wrote {len(written)} file(s) to {out_dir}")
    if result.failed or result.skipped:
        from onnx_saliency.output.batch import PartialFailure

        # keys: a method (left out entirely) or "method sanity-mode" (only that check's cells are empty)
        parts = [f"-m {key} failed; its cells are empty" if " " in key
                 else f"-m {key} failed and is left out of the evaluation" for key in result.failed]
        if result.skipped:
            parts.insert(0, f"{len(result.skipped)} of {len(images)} image(s) failed and were skipped: "
                            f"{', '.join(result.skipped)}")
        raise PartialFailure("; ".join(parts))


