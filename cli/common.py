"""What every command shares: one-line errors instead of tracebacks, the model options, the images and
KEY=VALUE options on the command line, byte sizes and memory figures. No command imports another command."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

import click

from onnx_saliency.errors import SaliencyError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                  ".pnm", ".pam"}


CRASH = 3  # exit code of an unexpected error (a bug); 1 = some images or methods skipped, 2 = bad input


def _graph_pass_error():
    """graph_passes.GraphPassError where graph_passes was imported (else none can have been raised): a command
    does not import it (onnx, onnx-graphsurgeon: 0.1 s) before its work begins (onnx_saliency.prehash)."""
    passes = sys.modules.get("graph_passes")
    return getattr(passes, "GraphPassError", ()) if passes is not None else ()


def fail_cleanly(fn):
    """Turn library errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SaliencyError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except _graph_pass_error() as err:
            click.echo(f"error: {' '.join(str(err).split())}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.ClickException:
            raise
        except MemoryError:
            click.echo("error: out of memory (lower --batch-size or --memory-budget)", err=True)
            sys.exit(CRASH)
        except Exception as err:  # a bug: its own exit code, never 1 (some images skipped) or 2 (bad input)
            if os.environ.get("ONNX_SALIENCY_TRACEBACK"):
                raise
            text = " ".join(str(err).split())[:500]
            click.echo(f"error: unexpected {type(err).__name__}: {text} (a bug in onnx-saliency; please report it "
                       "with the command; ONNX_SALIENCY_TRACEBACK=1 shows the traceback)", err=True)
            sys.exit(CRASH)
        finally:
            if "onnx_saliency.prehash" in sys.modules:  # what this command began hashing, and did not read
                sys.modules["onnx_saliency.prehash"].forget()

    return wrapper


def split_model_and_images(args: tuple[str, ...], more: bool = False):
    """-> (model, images); `more`: images come from elsewhere too (URIs for --engine ray), so none here is fine."""
    from onnx_saliency.models import DEFAULT_MODEL_PATH, DEFAULT_SAMPLES_DIR

    if args and args[0].lower().endswith(".onnx"):
        model, rest = Path(args[0]), args[1:]
        if not model.is_file():  # before the images: `explain nothere.onnx` is about the model
            raise SaliencyError(f"{model}: no such model file")
    else:
        model, rest = DEFAULT_MODEL_PATH, args
    if not rest and model == DEFAULT_MODEL_PATH and not more:
        rest = (str(DEFAULT_SAMPLES_DIR),)
    if not rest and not more:
        raise SaliencyError(f"no images given to explain with {model}")
    return model, expand_images(rest) if rest else []


def prehash_model(inputs, cache_dir, no_cache: bool) -> None:
    """Begin hashing the model file named first in `inputs` on a second thread (onnx_saliency.prehash)."""
    if inputs and str(inputs[0]).lower().endswith(".onnx"):
        from onnx_saliency import prehash
        from onnx_saliency.engine.cache import default_cache_dir

        prehash.start(inputs[0], None if no_cache else cache_dir if cache_dir is not None else default_cache_dir())


def speak_up(explainer, inputs=None, model=None, quiet: bool = False) -> None:
    """Say on stderr what was assumed (Explainer.assumptions, which the sidecars record too). With no model
    named, the embedded demo model answers: a warning when the user brought images (a photo was surely meant
    for a real model), a note for the bare demo run."""
    from onnx_saliency.models import DEFAULT_MODEL_PATH

    if model == DEFAULT_MODEL_PATH and not (inputs and str(inputs[0]).lower().endswith(".onnx")):
        m = explainer.model
        size = "x".join(str(d) for d in m.input_hw)
        classes = ", ".join(m.labels or []) or f"{m.num_classes} classes"
        if inputs:
            text = (f"no model given: explaining with the embedded {size} shapes demo model, which only knows "
                    f"{classes}; name your model first (MODEL.onnx IMAGES...) to explain it")
            click.echo(f"warning: {text}", err=True)
        else:
            text = f"no model given: the embedded {size} shapes demo model ({classes}) on its sample images"
            note(text, quiet)
        explainer.assumptions.insert(0, text)
    for text in explainer.assumptions:
        if not text.startswith("no model given"):
            note(text, quiet)


def expand_images(items) -> list[Path]:
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
    from onnx_saliency.output.sidecar import output_name

    names = [output_name(p) for p in images]
    dupes = sorted({s for s in names if names.count(s) > 1})
    if dupes:
        raise SaliencyError(f"several images share the name {dupes[0]!r}; outputs are written per image stem")
    return images


class CompositeOption(click.Option):
    """An option naming an LRP composite: its help lists them all, looked up only when help is shown (the
    CLI starts without importing the LRP machinery)."""

    def get_help_record(self, ctx):
        from onnx_saliency.lrp import COMPOSITES

        if not getattr(self, "_listed", False):
            # wrapped here, at commas, in a block Click keeps as is (\b): its own wrapping breaks names at hyphens
            words = [f"{n}," for n in sorted(COMPOSITES)] + ["each", "but", "excitation-backprop", "also", "as",
                                                             "NAME-nobias", "(biases", "zeroed:", "docs/lrp-bias.md)."]
            lines, line = [], "One of:"
            for word in words:
                if len(line) + 1 + len(word) > 44:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}"
            self.help = f"{self.help or ''}\n\n\b\n" + "\n".join(lines + [line])
            self._listed = True
        return super().get_help_record(ctx)


def parse_options(pairs) -> dict:
    """KEY=VALUE pairs -> {key: value} (numbers cast; each method's declaration parses them for good)."""
    options = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise SaliencyError(f"--option {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key in options:
            raise SaliencyError(f"--option {key}: given twice")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key] = value
    return options


FLAG_OPTIONS = {"composite": "--composite", "rule_map": "--rule-map"}


def method_options(pairs, methods, **from_flags) -> dict:
    """The --option pairs (and options set by their own flag, such as composite=--composite) checked against
    what `methods` declare: an unknown key or a bad value is an error before any model is loaded."""
    from onnx_saliency.methods.options import check_options

    options = parse_options(pairs)
    for key, value in from_flags.items():
        if value is not None:
            if key in options:
                raise SaliencyError(f"{FLAG_OPTIONS.get(key, key)} and --option {key}: give it once")
            options[key] = value
    check_options(methods, options, FLAG_OPTIONS)
    return options


def parse_target(target):
    if target is None:
        return None
    parts = [t.strip() for t in target.split(",")]
    if not all(parts):
        raise SaliencyError(f"--target {target!r}: an empty class in the list")
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
    click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (1..1024)."),
]


def with_model_options(fn):
    for opt in reversed(model_options):
        fn = opt(fn)
    return fn


def explainer_from_options(model, preset, resize, crop, resize_mode, labels, provider, threads, check=True,
                           cache=None):
    """The Explainer for the model options; `check`: load the model in onnxruntime now, so a model it refuses
    fails before any image is read (explain passes False: its first method's session fails the same way,
    before anything is written, without building a session the run does not use). cache: Explainer's."""
    from onnx_saliency import Explainer

    ex = Explainer(model, preset=preset, provider=provider, threads=threads, labels=labels,
                   resize=resize, crop=crop, resize_mode=resize_mode, cache=cache)
    if check:
        ex.check_session()
    return ex


def parse_bytes(text: str, option: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '300000000' -> bytes."""
    import re

    units = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 10 ** 6, "mb": 10 ** 6,
             "mib": 2 ** 20, "g": 10 ** 9, "gb": 10 ** 9, "gib": 2 ** 30, "t": 10 ** 12, "tb": 10 ** 12,
             "tib": 2 ** 40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in units or float(match.group(1)) * units[match.group(2).lower()] < 1:
        raise SaliencyError(f"{option} {text!r}: expected a size such as 2GiB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def echo_rewrite_report(loaded, label: str = "rewrite") -> None:
    """What canonicalisation did to the model, node by node (the --report of every command)."""
    for line in loaded.report.lines():
        click.echo(f"{label}  {line}")


quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress bar and no notes on stderr (warnings and errors still print).")


class Progress:
    """A progress bar on stderr, drawn only on a terminal and not under --quiet: in pipes, logs and CI it would
    be noise. `update(n)` counts work done; `echo(line)` prints a line to stderr without tearing the bar."""

    def __init__(self, bar=None):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def echo(self, line: str) -> None:
        if self._bar is not None:
            click.echo("\r\x1b[K", nl=False, err=True)  # clear the bar's line; it redraws on the next update
        click.echo(line, err=True)
        if self._bar is not None:
            self._bar.render_progress()


@contextlib.contextmanager
def progress(length: int, label: str, quiet: bool = False):
    if quiet or length < 1 or not sys.stderr.isatty():
        yield Progress()
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True,
                           show_percent=True) as bar:
        yield Progress(bar)


def note(text: str, quiet: bool = False) -> None:
    """An informational line on stderr (what was assumed, what was done), silenced by --quiet."""
    if not quiet:
        click.echo(f"note: {text}", err=True)


def rendering_options(f):
    """--clip-percentile and --blend: how the commands that draw maps (explain, compare) colour signed and pixel
    maps (onnx_saliency.output.postprocess.render)."""
    f = click.option("--blend", is_flag=True, help="Draw signed and pixel maps over a grey copy of the photo "
                     "(colour where the map is strong); default: a heatmap of its own. CAMs are always overlaid.")(f)
    f = click.option("--clip-percentile", type=float, default=99.5, show_default=True,
                     help="Signed maps: colours saturate at this percentile of |R| (symmetric, white = 0); "
                     "unsigned pixel maps: at this percentile of the map. 100 = the maximum.")(f)
    return f


def rendering_from_options(clip_percentile: float, blend: bool):
    from onnx_saliency.output.sidecar import Rendering

    if not 0 < clip_percentile <= 100:
        raise SaliencyError(f"--clip-percentile {clip_percentile:g}: must be in (0, 100]")
    return Rendering(clip_percentile=clip_percentile, blend=blend)
