"""`onnx-saliency`: the Click group. Each command lives in a module of its own; this file only assembles them."""

from __future__ import annotations

import click

from .audit import audit
from .cache import cache
from .compare import compare
from .evaluate import evaluate
from .explain import explain
from .export import export_explainer
from .info import info
from .layers import layers
from .methods import list_methods
from .rules import rules


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-saliency")
def main():
    """Saliency maps for image classifiers, from the exported ONNX file alone."""


for _command in (explain, layers, info, rules, list_methods, compare, evaluate, audit, export_explainer, cache):
    main.add_command(_command)


if __name__ == "__main__":
    main()
