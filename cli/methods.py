"""`onnx-saliency methods`: the method list."""

from __future__ import annotations

import inspect
import shutil
import textwrap

import click


def _summary(cls) -> str:
    """The docstring's first paragraph, on one line: the whole description, never its first line alone."""
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())


@click.command("methods")
def list_methods():
    """List the available methods: name, what they explain at (a layer, the input pixels, or a transformer's
    attention blocks), description, and the options each takes (explain --option KEY=VALUE; kind, range or
    choices, default)."""
    from onnx_saliency.methods import ALIASES, METHODS

    width = max(map(len, METHODS)) + 2
    indent = " " * (width + 7)
    columns = max(80, shutil.get_terminal_size((100, 24)).columns)
    for name in sorted(METHODS):
        cls = METHODS[name]
        at = getattr(cls, "explains_at", None) or ("layer" if cls.uses_layer else "pixel")
        head = f"{name:<{width}}{at:<5}  "
        lines = textwrap.wrap(_summary(cls), columns - len(indent), break_on_hyphens=False) or [""]
        click.echo(head + lines[0])
        for line in lines[1:]:
            click.echo(indent + line)
        declared = cls().declared_options({}) if cls.options else {}
        if declared:
            text = "options: " + "; ".join(opt.describe() for opt in declared.values())
            for line in textwrap.wrap(text, columns - len(indent), break_on_hyphens=False):
                click.echo(indent + line)
    click.echo("")
    aliases = ", ".join(f"{alias} = {name}" for alias, name in sorted(ALIASES.items()))
    click.echo("\n".join(textwrap.wrap(f"aliases: {aliases}; METHOD+ge puts Gradual Extrapolation on any layer "
                                       "method's map (e.g. gradcam+ge).", columns, subsequent_indent="  ")))
