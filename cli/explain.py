"""`onnx-saliency explain`: maps for images, written per image and method."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from onnx_saliency.errors import SaliencyError

from .common import (CompositeOption, explainer_from_options, fail_cleanly, method_options, mib, parse_bytes,
                     parse_target, peak_rss_bytes, prehash_model, progress, quiet_option, rendering_from_options,
                     rendering_options, speak_up, split_model_and_images, with_model_options)


@click.command()
@click.argument("inputs", nargs=-1)
@click.option("-m", "--method", "methods", multiple=True, default=("gradcam",), show_default=True,
              help="Method (repeatable). See `onnx-saliency methods`.")
@click.option("--layer", "layers", multiple=True, help="Layer tensor/node name or index (repeatable; default auto).")
@click.option("--target", default=None, help="top1 (default), a class index or label, or a comma list per image.")
@click.option("--out", "out_dir", type=click.Path(), default="saliency_out", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--option", "option_pairs", multiple=True, help="Method option KEY=VALUE (e.g. n=50, steps=32); "
              "`onnx-saliency methods` lists each method's options, ranges and defaults.")
@click.option("--composite", cls=CompositeOption, default=None,
              help="LRP composite for lrp and the LRP-based methods (the rule of every node: `onnx-saliency rules "
              "MODEL --composite NAME`).")
@click.option("--rule-map", type=click.Path(), default=None, help="LRP rule map file (JSON) mapping nodes to rules.")
@click.option("--resume", is_flag=True, help="Skip images whose outputs (png, npy, json) for every method already "
              "exist and are valid; redo the rest.")
@click.option("--max-pixels", type=int, default=None, help="Refuse images with more pixels than this, read from "
              "the file header before decoding (default 100000000).")
@click.option("--memory-budget", default="2GiB", show_default=True,
              help="Split batches so one onnxruntime call stays under this estimate (e.g. 512MiB, 8GiB).")
@click.option("--report", is_flag=True, help="Print what canonicalisation did, batch splits, peak memory and, for "
              "LRP, the conservation table per layer; and write OUT/report.html, one self-contained page with every "
              "image x method (pictures, targets, scores, settings, warnings, conservation tables).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process. ray: a Ray cluster (Ray Data actors; needs the [ray] extra).")
@click.option("--address", default=None, help="[ray] Cluster to join: auto, HOST:PORT or ray://HOST:PORT "
              "(default: start a local one).")
@click.option("--actors", type=int, default=None, help="[ray] Actors, one session each (default: cluster CPUs / "
              "--cpus-per-actor).")
@click.option("--cpus-per-actor", type=float, default=None, help="[ray] CPUs per actor, also its onnxruntime "
              "threads (default 1).")
@click.option("--gpus-per-actor", type=float, default=None, help="[ray] GPUs per actor, fractions share a GPU "
              "(with --provider cuda).")
@click.option("--format", "fmt", type=click.Choice(["files", "parquet"]), default=None,
              help="[ray] files: png/npy/json per image as the local engine (default); parquet: a sharded dataset.")
@click.option("--shard-size", type=int, default=None, help="[ray] Images per shard: one actor call, one "
              "Parquet file (default max(64, --batch-size)).")
@rendering_options
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the rewritten-graph cache (default: $ONNX_SALIENCY_CACHE, else the user's cache "
              "folder); `onnx-saliency cache info|clear`.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the rewritten-graph cache.")
@quiet_option
@with_model_options
@fail_cleanly
def explain(inputs, methods, layers, target, out_dir, batch_size, option_pairs, composite, rule_map, resume,
            max_pixels, memory_budget, report, engine, address, actors, cpus_per_actor, gpus_per_actor, fmt,
            shard_size, clip_percentile, blend, quiet, cache_dir=None, no_cache=False, **model_kw):
    """Explain IMAGES (files or folders) with MODEL (.onnx; default: the embedded shapes model).

    A bad image is reported on stderr (one line naming it) and skipped; the others are written. A method
    that fails on an image is reported (one line naming the image and the method); the other methods are
    written. Exit status: 0 every image explained (or already complete with --resume); 1 some images or
    methods failed (each reported, then a summary line listing them; all others written); 2 a usage, option
    or model error, found before any image is processed (nothing written), or an output that cannot be
    written (the run stops there); 130 interrupted. Outputs are whole files or absent: rerun with --resume to finish.
    """
    prehash_model(inputs, cache_dir, no_cache)  # before the imports below (onnx, onnxruntime, OpenCV)
    from onnx_saliency.output.batch import explain_images
    from onnx_saliency.output.sidecar import outputs_complete, write_image_outputs
    from onnx_saliency.methods import get_method
    from onnx_saliency.intake.preprocess import MAX_PIXELS

    if batch_size < 1:
        raise SaliencyError(f"--batch-size {batch_size}: must be at least 1")
    if max_pixels is not None and max_pixels < 1:
        raise SaliencyError(f"--max-pixels {max_pixels}: must be at least 1")
    budget = parse_bytes(memory_budget, "--memory-budget")
    rendering = rendering_from_options(clip_percentile, blend)
    scale = {"--address": address, "--actors": actors, "--cpus-per-actor": cpus_per_actor,
             "--gpus-per-actor": gpus_per_actor, "--format": fmt, "--shard-size": shard_size}
    if engine == "local" and any(v is not None for v in scale.values()):
        raise SaliencyError(f"{next(k for k, v in scale.items() if v is not None)}: needs --engine ray")
    if engine == "ray" and (clip_percentile != 99.5 or blend):
        raise SaliencyError("--clip-percentile/--blend: Ray actors draw with the defaults; use --engine local")
    if engine == "ray" and model_kw.get("threads") is not None:
        raise SaliencyError("--threads: with --engine ray each actor runs --cpus-per-actor threads")
    uris = tuple(i for i in inputs if "://" in i) if engine == "ray" else ()  # read by the actors
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SaliencyError(f"--out {out}: exists and is not a folder")
    model, images = split_model_and_images(tuple(i for i in inputs if i not in uris), bool(uris))
    images = images + list(uris)
    method_objs = [get_method(m) for m in methods]  # unknown methods fail before any work
    if rule_map is not None and not Path(rule_map).exists():  # a FIFO or folder: refused when read
        raise SaliencyError(f"--rule-map {rule_map}: no such file")
    options = method_options(option_pairs, method_objs, composite=composite, rule_map=rule_map)
    ex = explainer_from_options(model, **model_kw, check=engine == "ray",  # Ray: checked before actors start
                                cache=False if no_cache else cache_dir)
    speak_up(ex, inputs, model, quiet)
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
    targets = ex.targets(parse_target(target), len(images))
    if engine == "ray":
        return _explain_on_ray(ex, images, method_objs, layer_spec, parse_target(target), out, batch_size, options,
                               max_pixels, resume, report, scale, quiet)

    total = len(images) * len(method_objs)
    with progress(total, "explaining", quiet) as bar:
        outcome = explain_images(ex, images, [m.name for m in method_objs], out,
                                 layer=layer_spec if len(layer_spec) > 1 else layer_spec[0], targets=targets,
                                 batch_size=batch_size, options=options, max_pixels=max_pixels or MAX_PIXELS,
                                 resume=resume, on_failure=lambda line: bar.echo(f"error: {line}"),
                                 on_progress=bar.update,
                                 write=functools.partial(write_image_outputs, rendering=rendering),
                                 complete=functools.partial(outputs_complete, rendering=rendering))
    for image, method, value in outcome.constant:
        click.echo(f"warning: {image}: the {method} map is constant ({value:g}); saved as is, not normalised")
    if report:
        for method, note in outcome.notes:
            click.echo(f"{method}  {note}", err=True)
        if ex.model.batch:
            click.echo(f"batch  the model's input has a static batch of {ex.model.batch}: every onnxruntime call "
                       f"takes {ex.model.batch} image(s), whatever --batch-size says")
        for (asked, backward), (fitted, per_image) in sorted(ex.engine.batch_limits.items()):
            click.echo(f"memory  batch of {asked} split into runs of {fitted} ({'with' if backward else 'no'} "
                       f"backward pass: ~{mib(per_image)} per image, budget {mib(budget)})")
        peak = peak_rss_bytes()
        click.echo(f"memory  peak resident {mib(peak)} (getrusage ru_maxrss)" if peak is not None
                   else "memory  peak resident unknown on this platform")
        page = _run_report(ex, images, method_objs, out, options, rendering, outcome, layer_spec, budget)
        click.echo(f"report  {page}")
    resumed = f"; {len(outcome.resumed)} already complete (--resume)" if outcome.resumed else ""
    if outcome.partial:  # some images lost some methods: count outputs, not images
        click.echo(f"wrote {outcome.outputs} of {total} output(s) ({len(images)} image(s) x {len(method_objs)} "
                   f"method(s)) to {out}{resumed}")
    else:
        click.echo(f"wrote {len(outcome.written)} image(s) x {len(method_objs)} method(s) to {out}{resumed}")
    outcome.raise_for_failures(len(images))


def _explain_on_ray(ex, images, method_objs, layer_spec, target, out, batch_size, options, max_pixels, resume,
                    report, scale, quiet=False):
    """`--engine ray`: the same outputs, written by Ray Data actors (onnx_saliency.scale)."""
    from onnx_saliency.intake.preprocess import MAX_PIXELS
    from onnx_saliency.scale import explain_dataset

    with progress(len(images), "explaining", quiet) as bar:  # explain_dataset counts images
        outcome = explain_dataset(
            images, ex, [m.name for m in method_objs], layer=layer_spec if len(layer_spec) > 1 else layer_spec[0],
            target=target, out=out, fmt=scale["--format"] or "files", actors=scale["--actors"],
            cpus_per_actor=_given(scale["--cpus-per-actor"], 1), gpus_per_actor=_given(scale["--gpus-per-actor"], 0),
            batch_size=batch_size, shard_size=scale["--shard-size"], options=options,
            provider=ex.engine.provider, max_pixels=max_pixels or MAX_PIXELS, resume=resume,
            address=scale["--address"], on_failure=lambda line: bar.echo(f"error: {line}"),
            on_progress=bar.update)
    for image, method, value in outcome.constant:
        click.echo(f"warning: {image}: the {method} map is constant ({value:g}); saved as is, not normalised")
    if report:
        for method, note in outcome.notes:
            click.echo(f"{method}  {note}", err=True)
        for shard in outcome.shards:
            click.echo(f"shard  {shard['shard'] or '-'} pid {shard['pid']}: {shard['images']} image(s), decode "
                       f"{shard['decode_s']:.3f} s, explain {shard['explain_s']:.3f} s, write {shard['write_s']:.3f} s, "
                       f"actor peak resident {mib(shard['peak_rss'])}", err=True)
        click.echo("report  no report.html with --engine ray (the page and the LRP conservation tables are written "
                   "by --engine local)", err=True)
    resumed = f"; {outcome.resumed} already complete (--resume)" if outcome.resumed else ""
    where = f"{out} (Parquet shards in {out / 'maps'}, failures in {out / 'errors.parquet'})" if (
        scale["--format"] == "parquet") else str(out)
    click.echo(f"wrote {outcome.written} image(s) x {len(method_objs)} method(s) to {where}{resumed}")
    click.echo(f"ray: {outcome.written + len(outcome.failed)} image(s) in {outcome.seconds:.1f} s "
               f"({outcome.images_per_s:.1f} images/s) on {outcome.actors} actor(s); {len(outcome.failed)} failed; "
               f"driver setup {outcome.setup_seconds:.1f} s")
    outcome.raise_for_failures()


def _run_report(ex, images, method_objs, out, options, rendering, outcome, layer_spec, budget):
    """Print the LRP conservation tables and write OUT/report.html; returns its path."""
    import cv2
    import numpy as np

    from onnx_saliency import lrp
    from onnx_saliency.intake.preprocess import load_image
    from onnx_saliency.methods.lrp import LRP
    from onnx_saliency.output.run_report import REPORT_NAME, Conservation, RunReport, collect_entries, write_report
    from onnx_saliency.output.postprocess import upscale
    from onnx_saliency.output.sidecar import versions

    m = ex.model
    settings = [("model", str(m.path)), ("sha256", m.sha256), ("input", f"{m.input_name} {m.layout}"),
                ("preprocessing", str(vars(ex.preprocessing) if hasattr(ex.preprocessing, "__dict__")
                                      else ex.preprocessing)),
                ("methods", ", ".join(x.name for x in method_objs)), ("layer", ", ".join(layer_spec)),
                ("options", ", ".join(f"{k}={v}" for k, v in options.items()) or "none"),
                ("pictures", f"clip percentile {rendering.clip_percentile:g}, blend {rendering.blend}, "
                             f"min height {rendering.min_height}"),
                ("memory budget", mib(budget)), ("execution provider", ex.engine.active_provider()),
                ("versions", ", ".join(f"{k} {v}" for k, v in versions().items()))]
    report = RunReport(model=m.path.name, settings=settings, rewrite=list(m.report.lines()))
    report.warnings += [f"assumed: {a}" for a in getattr(ex, "assumptions", [])]
    report.warnings += [f"{image}: the {method} map is constant ({value:g}); saved as is"
                        for image, method, value in outcome.constant]
    report.notes += [f"{method}: {note}" for method, note in outcome.notes]
    report.errors += list(outcome.failed.values()) + [f"{image}: -m {method}: {why}" for (image, method), why
                                                       in outcome.method_failed.items()]
    report.entries = collect_entries(out, images, [x.name for x in method_objs])

    for image in dict.fromkeys(e.image for e in report.entries):
        try:
            x, display = ex.prepare([load_image(image)])
        except SaliencyError:
            continue
        if display is not None:
            shown = upscale(display[0], rendering.min_height)
            ok, buf = cv2.imencode(".png", cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))
            if ok:
                report.inputs[image] = buf.tobytes()
        for entry in (e for e in report.entries if e.image == image):
            method = next(x for x in method_objs if x.name == entry.method)
            if not isinstance(method, LRP):
                continue
            composite = options.get("composite") or method.default_composite
            init = options.get("init") or method.default_init
            target = int(entry.meta["target"]["class"])
            rows = lrp.conservation_table(ex.engine, x, [target], composite=composite, init=init,
                                          rule_map=options.get("rule_map"), low=options.get("low"),
                                          high=options.get("high"))
            scores = ex.engine.run(x, np.array([target]), outputs=[m.score_tensor])[m.score_tensor]
            start = float(lrp.initial_total(scores, np.array([target]), init)[0])
            c = Conservation(image, method.name, entry.meta.get("options", {}).get("composite", str(composite)), start,
                             [{k: (float(v[0]) if k in ("out", "in") else v) for k, v in row.items()} for row in rows])
            report.conservation.append(c)
            click.echo(f"conservation  {image} -m {method.name} (composite {c.composite}, start {start:.6g})")
            for line in lrp.format_conservation(rows):
                click.echo(f"conservation  {line}")
    return write_report(out / REPORT_NAME, report)


def _given(value, default):
    return default if value is None else value
