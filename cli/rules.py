"""`onnx-saliency rules`: the LRP rule of every node, before anything runs."""

from __future__ import annotations

import click

from onnx_saliency.errors import SaliencyError

from .common import CompositeOption, echo_rewrite_report, explainer_from_options, fail_cleanly, with_model_options


@click.command()
@click.argument("model", type=click.Path())
@click.option("--composite", cls=CompositeOption, default="epsilon-plus-flat-nobias", show_default=True,
              help="LRP composite: which rule each kind of layer gets.")
@click.option("--rule-map", type=click.Path(), default=None, help="JSON rule map (overrides --composite).")
@click.option("--report", is_flag=True, help="Also print what canonicalisation did, node by node.")
@click.option("--image", type=click.Path(), default=None,
              help="Also run LRP on this image (top-1 class): transformers print per-block conservation and the "
                   "share of relevance the class/position embeddings absorb.")
@with_model_options
@fail_cleanly
def rules(model, composite, rule_map, report, image, **model_kw):
    """Print the LRP rule of every node, folded BatchNorms, residual Adds and nodes without a rule."""
    from onnx_saliency import lrp

    ex = explainer_from_options(model, **model_kw)
    if report:
        echo_rewrite_report(ex.model)
    comp = lrp.resolve_composite(ex.engine, composite, rule_map)
    x = ex.prepare([image])[0] if image is not None else None  # a bad image fails before anything is printed
    lines = lrp.rule_report(ex.model, comp)
    for line in lines:
        click.echo(line)
    missing = [line.split("\t")[:2] for line in lines if "\tNO RULE" in line]
    if missing:
        from graph_passes import summarize_nodes

        raise SaliencyError(f"{len(missing)} node(s) have no relevance rule: {summarize_nodes(missing)}")
    if x is not None:
        from onnx_saliency.lrp.blocks import conservation_lines, token_stream

        stream = token_stream(ex.model.canonical, ex.model.score_tensor)
        at = [ex.model.input_name] + (stream.tensors() if stream else [])
        out = lrp.relevance_at(ex.engine, x, composite=comp, at=at)
        total = out["relevance"][ex.model.input_name].sum() / (out["start"][0] or 1.0)
        click.echo(f"on {image} (class {int(out['targets'][0])}): sum R(input) / start = {total:.4g}")
        for line in conservation_lines(stream, out["relevance"], out["start"]) if stream else []:
            click.echo(line)
