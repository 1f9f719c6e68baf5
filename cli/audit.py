"""`onnx-saliency audit A.onnx B.onnx IMAGES...`: do two exports compute and explain the same thing?"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import expand_images, fail_cleanly, method_options, note, progress, quiet_option


@click.command("audit")
@click.argument("model_a", type=click.Path())
@click.argument("model_b", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("-m", "--method", "methods", multiple=True, default=("gradcam",), show_default=True,
              help="Method to compare (repeatable).")
@click.option("--preset-a", default=None, help="Preprocessing preset of A (default: its metadata / manifest).")
@click.option("--preset-b", default=None, help="Preprocessing preset of B (default: its metadata / manifest).")
@click.option("--layer", default="auto", show_default=True, help="A's layer for CAM methods; B uses its match.")
@click.option("--tolerance", "tolerance_pairs", multiple=True,
              help="KEY=VALUE (repeatable): logits (relative, 1e-3), top1 (fraction, 1), pearson (0.99), ssim (0), "
                   "iou (0), weights (1e-3), activations (1e-3), layer_cam (0.99); 0 = report only.")
@click.option("--option", "option_pairs", multiple=True, help="Method option KEY=VALUE.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="audit_out", show_default=True,
              help="Folder for audit.json and audit.html.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--report", is_flag=True, help="Also print what canonicalisation did to each model, node by node.")
@quiet_option
@fail_cleanly
def audit(model_a, model_b, images, methods, preset_a, preset_b, layer, tolerance_pairs, option_pairs, out_dir,
          batch_size, provider, threads, report, quiet):
    """Compare MODEL_A and MODEL_B on IMAGES: predictions, layers side by side, and explanations.

    Exit code 0 when they agree within the tolerances, 1 when they do not (2 for usage errors)."""
    from onnx_saliency.audit.compare import Tolerances, progress_units
    from onnx_saliency.audit.compare import audit as run_audit
    from onnx_saliency.audit.report import table_lines, write_audit
    from onnx_saliency.errors import SaliencyError
    from onnx_saliency.methods import get_method

    
    if batch_size < 1:
        raise SaliencyError(f"--batch-size {batch_size}: must be at least 1")
    tol = Tolerances.parse(tolerance_pairs)
    options = method_options(option_pairs, [get_method(m) for m in methods])  # unknown methods and
    # options fail before any model is loaded
    paths = expand_images(images)
    with progress(progress_units(methods), "auditing", quiet) as bar:
        result = run_audit(model_a, model_b, paths, methods, preset_a=preset_a, preset_b=preset_b, layer=layer,
                           tolerances=tol, options=options, batch_size=batch_size,
                           provider=provider, threads=threads, progress=bar.update)
    for key in ("a", "b"):
        for text in result.models[key]["assumptions"]:
            note(f"{key.upper()}: {text}", quiet)
    if report:
        for key in ("a", "b"):
            for line in result.models[key]["rewrite"]:
                click.echo(f"rewrite {key.upper()}  {line}")
    for line in table_lines(result):
        click.echo(line)
    json_path, html_path = write_audit(result, Path(out_dir))
    click.echo(f"wrote {json_path} and {html_path}")
    sys.exit(0 if result.agree else 1)
