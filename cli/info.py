"""`onnx-saliency info`: what a model takes, gives and how it will be preprocessed."""

from __future__ import annotations

import click

from .common import explainer_from_options, fail_cleanly, with_model_options


@click.command()
@click.argument("model", type=click.Path())
@with_model_options
@click.option("--report", is_flag=True, help="Also print what canonicalisation did, node by node.")
@fail_cleanly
def info(model, report, **model_kw):
    """Inputs, outputs, preprocessing, classes and op counts of MODEL."""
    from collections import Counter

    ex = explainer_from_options(model, **model_kw)
    m = ex.model
    pre = ex.preprocessing
    ops = Counter(n.op_type for n in m.canonical.graph.node)
    known = m.known
    click.echo(f"model        {m.path}")
    click.echo(f"sha256       {m.sha256}")
    if known:
        click.echo(f"known as     {known.get('name')}")
    click.echo(f"input        {m.input_name} ({m.layout}, {m.channels}x{m.input_hw[0]}x{m.input_hw[1]})")
    if m.batch:
        click.echo(f"batch        static {m.batch}: every run takes {m.batch} image(s) per onnxruntime call")
    click.echo(f"output       {m.output_name}; explaining {m.score_tensor} ({m.num_classes} classes)")
    click.echo(f"preprocess   preset={pre.preset} resize={pre.resize} crop={pre.crop} mode={pre.resize_mode}")
    for text in ex.assumptions:
        click.echo(f"assumed      {text}")
    click.echo(f"labels       {'yes' if m.labels else 'none'}")
    click.echo(f"auto layer   {ex.resolve_layer('auto')}")
    click.echo(f"ops          {', '.join(f'{k} {v}' for k, v in sorted(ops.items()))}")
    from onnx_saliency.export import explain_graph_info

    explain = explain_graph_info(m.original)
    if explain:
        click.echo(f"explain graph: method={explain['method']}, outputs={explain.get('outputs', '?')}")
    if report:
        for line in m.report.lines():
            click.echo(f"rewrite      {line}")
