"""`onnx-saliency export-explainer MODEL --method M -o explain.onnx`: a standalone explain graph."""

from __future__ import annotations

from pathlib import Path

import click

from .common import fail_cleanly


@click.command("export-explainer")
@click.argument("model", type=click.Path())
@click.option("-m", "--method", default="gradcam", show_default=True,
              help="gradcam, gradcam++, xgradcam, layercam, hirescam, gradcam-elementwise, gradient, "
                   "gradient-x-input, guided-backprop, lrp, excitation-backprop.")
@click.option("--layer", "layers", multiple=True, help="CAM layer(s): tensor/node name or index (default auto).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), required=True, help="The .onnx to write.")
@click.option("--resize/--no-resize", default=True, show_default=True,
              help="CAM maps min-maxed and resized to the input (as the API), or the raw ReLU map at the layer.")
@click.option("--composite", default=None, help="LRP composite (default epsilon-plus-flat).")
@click.option("--rule-map", type=click.Path(), default=None, help="LRP rule map file.")
@click.option("--init", default=None, help="LRP initial relevance: logit | one | contrastive | sglrp.")
@click.option("--report", is_flag=True, help="Also print what canonicalisation did, node by node.")
@click.option("--preset", default=None, help="Preprocessing preset recorded in the file's metadata.")
@click.option("--labels", type=click.Path(), default=None, help="Class names recorded in the file's metadata.")
@fail_cleanly
def export_explainer(model, method, layers, output, resize, composite, rule_map, init, report, preset, labels):
    """Write MODEL's explain graph: original outputs + target_class, target_score, saliency_map
    (+ attributions for pixel methods); inputs: the image and `targets` (int64, -1 = top-1)."""
    from onnx_saliency import Explainer
    from onnx_saliency.errors import SaliencyError
    from onnx_saliency.export import export_explainer as export

    if rule_map is not None and not Path(rule_map).is_file():
        raise SaliencyError(f"--rule-map {rule_map}: no such file")
    ex = Explainer(model, preset=preset, labels=labels)
    if report:
        for line in ex.model.report.lines():
            click.echo(f"rewrite  {line}")
    graph = export(ex, output, method, list(layers) or ["auto"], resize=resize, composite=composite,
                   rule_map=rule_map, init=init)
    inputs = ", ".join(i.name for i in graph.graph.input)
    outputs = ", ".join(o.name for o in graph.graph.output)
    click.echo(f"wrote {output}: inputs {inputs}; outputs {outputs}")
