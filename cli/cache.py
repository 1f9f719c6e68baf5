"""`onnx-saliency cache info|clear`: the folder of rewritten graphs that later runs reuse."""

from __future__ import annotations

import click

from .common import fail_cleanly, mib

_FOLDER = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                       help="The cache folder (default: $ONNX_SALIENCY_CACHE, else the user's cache folder).")


def _folder(cache_dir):
    from onnx_saliency.engine.cache import default_cache_dir

    folder = cache_dir if cache_dir is not None else default_cache_dir()
    if folder is None:
        click.echo("cache        off ($ONNX_SALIENCY_CACHE disables it)")
    return folder


@click.group()
def cache():
    """The cache of rewritten graphs (one file per model and method graph, checked by hash when read)."""


@cache.command("info")
@_FOLDER
@fail_cleanly
def cache_info(cache_dir):
    """Where the cache is, how many graphs it holds and their size."""
    from onnx_saliency.engine.cache import DEFAULT_MAX_BYTES, info

    folder = _folder(cache_dir)
    if folder is None:
        return
    found = info(folder)
    click.echo(f"cache        {found['folder']}")
    click.echo(f"entries      {found['entries']}")
    click.echo(f"optimized    {found['optimized']} onnxruntime-optimised graph(s), {found['weight_files']} weight "
               "file(s)")
    click.echo(f"size         {mib(found['bytes'])} (bound {mib(DEFAULT_MAX_BYTES)}, least recently used evicted)")


@cache.command("clear")
@_FOLDER
@fail_cleanly
def cache_clear(cache_dir):
    """Delete every cached graph."""
    from onnx_saliency.engine.cache import clear

    folder = _folder(cache_dir)
    if folder is None:
        return
    click.echo(f"removed {clear(folder)} cached graph(s) from {folder}")
