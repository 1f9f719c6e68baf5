"""`onnx-saliency layers`: the candidate layers of a model."""

from __future__ import annotations

import click

from .common import echo_rewrite_report, explainer_from_options, fail_cleanly, with_model_options


@click.command()
@click.argument("model", type=click.Path())
@with_model_options
@click.option("--report", is_flag=True, help="Also print what canonicalisation did, node by node.")
@fail_cleanly
def layers(model, report, **model_kw):
    """List candidate layers: tensor, producing node, op, shape, and the torch module path where the export
    recorded it (dynamo exports; usable as --layer); the auto choice is marked."""
    ex = explainer_from_options(model, **model_kw)
    if report:
        echo_rewrite_report(ex.model)
    auto = ex.resolve_layer("auto")
    layers = ex.layers()
    modules = any(layer.module for layer in layers)  # torch module paths, where a dynamo export recorded them
    click.echo("tensor\tnode\top\tshape" + ("\tmodule" if modules else ""))
    for layer in layers:
        click.echo(layer.describe(modules) + ("\t(auto)" if layer.tensor == auto else ""))
