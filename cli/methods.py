"""`onnx-saliency methods`: the method list."""

from __future__ import annotations

import click


@click.command("methods")
def list_methods():
    """List the available methods."""
    from onnx_saliency.methods import METHODS

    for name in sorted(METHODS):
        cls = METHODS[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        click.echo(f"{name:24s} {'layer' if cls.uses_layer else 'pixel'}  {doc[0] if doc else ''}")
