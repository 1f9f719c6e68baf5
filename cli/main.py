"""`onnx-saliency`: the Click front end. Parse, call the library, print, write; nothing else lives here."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from onnx_saliency.errors import SaliencyError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                  ".pnm", ".pam"}


def fail_cleanly(fn):
    """Turn library errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from graph_passes import GraphPassError

        try:
            return fn(*args, **kwargs)
        except SaliencyError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except GraphPassError as err:
            click.echo(f"error: {' '.join(str(err).split())}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-saliency")
def main():
    """Saliency maps for image classifiers, from the exported ONNX file alone."""


def _split_model_and_images(args: tuple[str, ...]):
    from onnx_saliency.models import DEFAULT_MODEL_PATH, DEFAULT_SAMPLES_DIR

    if args and args[0].lower().endswith(".onnx"):
        model, rest = Path(args[0]), args[1:]
    else:
        model, rest = DEFAULT_MODEL_PATH, args
    if not rest and model == DEFAULT_MODEL_PATH:
        rest = (str(DEFAULT_SAMPLES_DIR),)
    if not rest:
        raise SaliencyError(f"no images given to explain with {model}")
    return model, _expand_images(rest)


def _expand_images(items) -> list[Path]:
    images: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise SaliencyError(f"{p}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            images += found
        elif p.is_file():
            images.append(p)
        else:
            raise SaliencyError(f"{p}: no such image file or folder")
    stems = [p.stem for p in images]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise SaliencyError(f"several images share the name {dupes[0]!r}; outputs are written per image stem")
    return images


def _parse_options(pairs) -> dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SaliencyError(f"--option {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key.strip()] = value
    return options


def _parse_target(target):
    if target is None:
        return None
    parts = [t.strip() for t in target.split(",")]
    return parts[0] if len(parts) == 1 else parts


model_options = [
    click.option("--preset", default=None, help="Preprocessing preset: torchvision, caffe, tf, efficientnet-lite, raw "
                 "(default: from the model's metadata or the known-model manifest)."),
    click.option("--resize", type=int, default=None, help="Resize the shorter side to this many pixels."),
    click.option("--crop", type=int, default=None, help="Centre-crop size."),
    click.option("--resize-mode", type=click.Choice(["shorter", "square", "none"]), default=None),
    click.option("--labels", "labels", type=click.Path(), default=None,
                 help="Class names: JSON list, Keras class-index JSON, or a text file with one name per line."),
    click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
    click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads."),
]


def with_model_options(fn):
    for opt in reversed(model_options):
        fn = opt(fn)
    return fn


def _explainer(model, preset, resize, crop, resize_mode, labels, provider, threads):
    from onnx_saliency import Explainer

    return Explainer(model, preset=preset, provider=provider, threads=threads, labels=labels,
                     resize=resize, crop=crop, resize_mode=resize_mode)


def _parse_bytes(text: str, option: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '300000000' -> bytes."""
    import re

    units = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 10 ** 6, "mb": 10 ** 6,
             "mib": 2 ** 20, "g": 10 ** 9, "gb": 10 ** 9, "gib": 2 ** 30, "t": 10 ** 12, "tb": 10 ** 12,
             "tib": 2 ** 40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in units or float(match.group(1)) * units[match.group(2).lower()] < 1:
        raise SaliencyError(f"{option} {text!r}: expected a size such as 2GiB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("-m", "--method", "methods", multiple=True, default=("gradcam",), show_default=True,
              help="Method (repeatable). See `onnx-saliency methods`.")
@click.option("--layer", "layers", multiple=True, help="Layer tensor/node name or index (repeatable; default auto).")
@click.option("--target", default=None, help="top1 (default), a class index or label, or a comma list per image.")
@click.option("--out", "out_dir", type=click.Path(), default="saliency_out", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--option", "option_pairs", multiple=True, help="Method option KEY=VALUE (e.g. n=50, steps=32).")
@click.option("--composite", default=None, help="LRP composite (see `onnx-saliency rules --help`).")
@click.option("--rule-map", type=click.Path(), default=None, help="LRP rule map file (JSON) mapping nodes to rules.")
@click.option("--resume", is_flag=True, help="Skip images whose outputs (png, npy, json) for every method already "
              "exist and are valid; redo the rest.")
@click.option("--max-pixels", type=int, default=None, help="Refuse images with more pixels than this, read from "
              "the file header before decoding (default 100000000).")
@click.option("--memory-budget", default="2GiB", show_default=True,
              help="Split batches so one onnxruntime call stays under this estimate (e.g. 512MiB, 8GiB).")
@click.option("--report", is_flag=True, help="Print what canonicalisation did, batch splits, peak memory and, for "
              "LRP, a conservation table.")
@with_model_options
@fail_cleanly
def explain(inputs, methods, layers, target, out_dir, batch_size, option_pairs, composite, rule_map, resume,
            max_pixels, memory_budget, report, **model_kw):
    """Explain IMAGES (files or folders) with MODEL (.onnx; default: the embedded shapes model).

    A bad image is reported on stderr (one line naming it) and skipped; the others are written. Exit
    status: 0 every image explained (or already complete with --resume); 1 some images failed (each
    reported, then a summary line listing them; all others written); 2 a usage, option or model error,
    found before any image is processed (nothing written), or an output that cannot be written (the run
    stops there); 130 interrupted. Outputs are whole files or absent: rerun with --resume to finish.
    """
    from onnx_saliency.batch import explain_images
    from onnx_saliency.methods import get_method
    from onnx_saliency.preprocess import MAX_PIXELS

    if batch_size < 1:
        raise SaliencyError(f"--batch-size {batch_size}: must be at least 1")
    if max_pixels is not None and max_pixels < 1:
        raise SaliencyError(f"--max-pixels {max_pixels}: must be at least 1")
    budget = _parse_bytes(memory_budget, "--memory-budget")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SaliencyError(f"--out {out}: exists and is not a folder")
    model, images = _split_model_and_images(inputs)
    method_objs = [get_method(m) for m in methods]  # unknown methods fail before any work
    options = _parse_options(option_pairs)
    if composite is not None:
        options["composite"] = composite
    if rule_map is not None:
        if not Path(rule_map).is_file():
            raise SaliencyError(f"--rule-map {rule_map}: no such file")
        options["rule_map"] = rule_map
    ex = _explainer(model, **model_kw)
    ex.engine.memory_budget = budget
    if composite is not None or rule_map is not None:
        from onnx_saliency import lrp

        lrp.resolve_composite(ex.engine, composite, rule_map)
    if report:
        for line in ex.model.report.lines():
            click.echo(f"rewrite  {line}")
    layer_spec = list(layers) if layers else ["auto"]
    for m in method_objs:
        if m.uses_layer:
            for spec in layer_spec:
                ex.resolve_layer(spec)
    targets = ex.targets(_parse_target(target), len(images))

    total = len(images) * len(method_objs)
    hidden = total < 2 or not sys.stderr.isatty()  # in logs and CI a progress bar is noise
    with click.progressbar(length=len(images), label="explaining", file=sys.stderr, hidden=hidden) as bar:
        outcome = explain_images(ex, images, [m.name for m in method_objs], out,
                                 layer=layer_spec if len(layer_spec) > 1 else layer_spec[0], targets=targets,
                                 batch_size=batch_size, options=options, max_pixels=max_pixels or MAX_PIXELS,
                                 resume=resume, on_failure=lambda line: click.echo(f"error: {line}", err=True),
                                 on_progress=bar.update)
    for image, method, value in outcome.constant:
        click.echo(f"warning: {image}: the {method} map is constant ({value:g}); saved as is, not normalised")
    if report:
        for method, note in outcome.notes:
            click.echo(f"{method}  {note}", err=True)
        for (asked, backward), (fitted, per_image) in sorted(ex.engine.batch_limits.items()):
            click.echo(f"memory  batch of {asked} split into runs of {fitted} ({'with' if backward else 'no'} "
                       f"backward pass: ~{_mib(per_image)} per image, budget {_mib(budget)})")
        peak = _peak_rss_bytes()
        click.echo(f"memory  peak resident {_mib(peak)} (getrusage ru_maxrss)" if peak is not None
                   else "memory  peak resident unknown on this platform")
    resumed = f"; {len(outcome.resumed)} already complete (--resume)" if outcome.resumed else ""
    click.echo(f"wrote {len(outcome.written)} image(s) x {len(method_objs)} method(s) to {out}{resumed}")
    outcome.raise_for_failures(len(images))


def echo_rewrite_report(loaded, label: str = "rewrite") -> None:
    """What canonicalisation did to the model, node by node (the --report of every command)."""
    for line in loaded.report.lines():
        click.echo(f"{label}  {line}")


@main.command()
@click.argument("model", type=click.Path())
@with_model_options
@click.option("--report", is_flag=True, help="Also print what canonicalisation did, node by node.")
@fail_cleanly
def layers(model, report, **model_kw):
    """List candidate layers: tensor, producing node, op, shape (the auto choice is marked)."""
    ex = _explainer(model, **model_kw)
    if report:
        echo_rewrite_report(ex.model)
    auto = ex.resolve_layer("auto")
    click.echo("tensor\tnode\top\tshape")
    for layer in ex.layers():
        click.echo(layer.describe() + ("\t(auto)" if layer.tensor == auto else ""))


@main.command()
@click.argument("model", type=click.Path())
@with_model_options
@click.option("--report", is_flag=True, help="Also print what canonicalisation did, node by node.")
@fail_cleanly
def info(model, report, **model_kw):
    """Inputs, outputs, preprocessing, classes and op counts of MODEL."""
    from collections import Counter

    ex = _explainer(model, **model_kw)
    m = ex.model
    pre = ex.preprocessing
    ops = Counter(n.op_type for n in m.canonical.graph.node)
    known = m.known
    click.echo(f"model        {m.path}")
    click.echo(f"sha256       {m.sha256}")
    if known:
        click.echo(f"known as     {known.get('name')}")
    click.echo(f"input        {m.input_name} ({m.layout}, {m.channels}x{m.input_hw[0]}x{m.input_hw[1]})")
    click.echo(f"output       {m.output_name}; explaining {m.score_tensor} ({m.num_classes} classes)")
    click.echo(f"preprocess   preset={pre.preset} resize={pre.resize} crop={pre.crop} mode={pre.resize_mode}")
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


@main.command()
@click.argument("model", type=click.Path())
@click.option("--composite", default="epsilon-plus-flat", show_default=True)
@click.option("--rule-map", type=click.Path(), default=None, help="JSON rule map (overrides --composite).")
@click.option("--report", is_flag=True, help="Also print what canonicalisation did, node by node.")
@with_model_options
@fail_cleanly
def rules(model, composite, rule_map, report, **model_kw):
    """Print the LRP rule of every node, folded BatchNorms, residual Adds and nodes without a rule."""
    from onnx_saliency import lrp

    ex = _explainer(model, **model_kw)
    if report:
        echo_rewrite_report(ex.model)
    comp = lrp.resolve_composite(ex.engine, composite, rule_map)
    lines = lrp.rule_report(ex.model, comp)
    for line in lines:
        click.echo(line)
    missing = [line for line in lines if "NO RULE" in line]
    if missing:
        raise SaliencyError(f"{len(missing)} node(s) have no relevance rule: "
                            + ", ".join(line.split("\t")[0] + f" ({line.split(chr(9))[1]})" for line in missing))


@main.command("methods")
def list_methods():
    """List the available methods."""
    from onnx_saliency.methods import METHODS

    for name in sorted(METHODS):
        cls = METHODS[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        click.echo(f"{name:24s} {'layer' if cls.uses_layer else 'pixel'}  {doc[0] if doc else ''}")


if __name__ == "__main__":
    main()
from . import evaluate as _evaluate  # noqa: E402,F401  registers `evaluate` on main (import-order safe)
from . import compare as _compare  # noqa: E402,F401  registers `compare` on main (import-order safe)
from .audit import audit as _audit_command; main.add_command(_audit_command)  # noqa: E402
from .export import export_explainer as _export_command; main.add_command(_export_command)  # noqa: E402
