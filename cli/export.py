"""`onnx-saliency export-explainer MODEL --method M -o explain.onnx`: a standalone explain graph."""

from __future__ import annotations

import re
from pathlib import Path

import click

from .common import fail_cleanly


@click.command("export-explainer")
@click.argument("model", type=click.Path())
@click.option("-m", "--method", default="gradcam", show_default=True,
              help="gradcam, gradcam++, xgradcam, layercam, hirescam, gradcam-elementwise, gradient, "
                   "gradient-x-input, guided-backprop, lrp, excitation-backprop.")
@click.option("--layer", "layers", multiple=True, help="CAM layer(s): tensor/node name or index (default auto).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="The .onnx to write (required unless --triton is given).")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False), default=None,
              help="Also write a Triton model repository entry: DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx.")
@click.option("--triton-name", default=None, help="Model name in the Triton repository (default MODEL_METHOD).")
@click.option("--max-batch-size", type=int, default=16, show_default=True,
              help="Triton max_batch_size (dynamic batching); 0 turns batching off.")
@click.option("--triton-kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Triton instance kind (KIND_CPU or KIND_GPU).")
@click.option("--resize/--no-resize", default=True, show_default=True,
              help="CAM maps min-maxed and resized to the input (as the API), or the raw ReLU map at the layer.")
@click.option("--composite", default=None, help="LRP composite (default epsilon-plus-flat-nobias; see docs/lrp-bias.md).")
@click.option("--rule-map", type=click.Path(), default=None, help="LRP rule map file.")
@click.option("--init", default=None, help="LRP initial relevance: logit | one | contrastive | sglrp.")
@click.option("--report", is_flag=True, help="Also print what canonicalisation did, node by node.")
@click.option("--preset", default=None, help="Preprocessing preset recorded in the file's metadata.")
@click.option("--labels", type=click.Path(), default=None, help="Class names recorded in the file's metadata.")
@fail_cleanly
def export_explainer(model, method, layers, output, triton_dir, triton_name, max_batch_size, triton_kind, resize,
                     composite, rule_map, init, report, preset, labels):
    """Write MODEL's explain graph: original outputs + target_class, target_score, saliency_map
    (+ attributions for pixel methods); inputs: the image and `targets` (int64, -1 = top-1)."""
    import onnx

    from onnx_saliency import Explainer
    from onnx_saliency.errors import SaliencyError
    from onnx_saliency.export import build_explain_graph, export_explainer as export

    if output is None and triton_dir is None:
        raise SaliencyError("export-explainer: give -o FILE.onnx, --triton DIR, or both")
    if rule_map is not None and not Path(rule_map).exists():  # a FIFO or folder: refused when read
        raise SaliencyError(f"--rule-map {rule_map}: no such file")
    ex = Explainer(model, preset=preset, labels=labels)
    if report:
        for line in ex.model.report.lines():
            click.echo(f"rewrite  {line}")
    kw = dict(resize=resize, composite=composite, rule_map=rule_map, init=init)
    if triton_dir is not None:
        from onnx_saliency.scale.triton import triton_config, write_triton_repository

        name = triton_name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"{Path(model).stem}_{method}")
        triton_config(onnx.ModelProto(), name, max_batch_size, triton_kind)  # name and numbers, before the work
    graph = export(ex, output, method, list(layers) or ["auto"], **kw) if output else build_explain_graph(
        ex, method, list(layers) or ["auto"], **kw)
    inputs = ", ".join(i.name for i in graph.graph.input)
    outputs = ", ".join(o.name for o in graph.graph.output)
    if output:
        click.echo(f"wrote {output}: inputs {inputs}; outputs {outputs}")
    if triton_dir is not None:
        folder = write_triton_repository(graph, triton_dir, name, max_batch_size=max_batch_size, kind=triton_kind)
        click.echo(f"wrote {folder}/config.pbtxt and {folder}/1/model.onnx: inputs {inputs}; outputs {outputs}")
