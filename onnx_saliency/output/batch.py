"""Explaining a folder of images: a bad image is reported and skipped, a method that fails is reported, and
everything else is written.

Per-image failures (unreadable or refused image) are collected in :attr:`BatchOutcome.failed`; per-method
failures (a method that cannot run on these images, NaN/Inf in its result for one image, out of memory) in
:attr:`BatchOutcome.method_failed`, one entry per image and method, and the other methods are still written.
Errors that would fail every output alike (an output that cannot be written) are raised. Within a chunk every
method runs before anything is written. With ``resume``, (image, method) pairs whose outputs are complete
(:func:`report.outputs_complete`) are not recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError, NumericalError, SaliencyError
from ..intake.preprocess import MAX_PIXELS, load_image
from .sidecar import outputs_complete, write_image_outputs


class PartialFailure(SaliencyError):
    """Some images or methods failed; the rest were written. The CLI exits 1 (usage and model errors exit 2)."""

    exit_code = 1


@dataclass
class BatchOutcome:
    written: list[Path] = field(default_factory=list)        # every requested method written now
    resumed: list[Path] = field(default_factory=list)        # everything already complete (--resume)
    failed: dict[Path, str] = field(default_factory=dict)    # image -> the one-line reason; nothing written for it
    method_failed: dict[tuple[Path, str], str] = field(default_factory=dict)  # (image, method) -> reason
    outputs: int = 0                                          # (image, method) outputs written now
    constant: list[tuple[Path, str, float]] = field(default_factory=list)  # (image, method, value)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (method, note), each once

    @property
    def partial(self) -> list[Path]:
        """Images with some methods written and some failed."""
        return list(dict.fromkeys(p for p, _ in self.method_failed if p not in self.failed))

    def raise_for_failures(self, total: int) -> None:
        parts = []
        if self.failed:
            names = ", ".join(p.name for p in self.failed)
            parts.append(f"{len(self.failed)} of {total} image(s) failed and were skipped: {names}")
        for method in dict.fromkeys(m for _, m in self.method_failed):
            images = [p for (p, m) in self.method_failed if m == method and p not in self.failed]
            if images:
                parts.append(f"-m {method} failed on {len(images)} of {total} image(s): "
                             f"{', '.join(p.name for p in images)} (the other methods were written)")
        if parts:
            raise PartialFailure("; ".join(parts))


def _naming(image: Path, err: Exception | str, method: str | None = None) -> str:
    text = str(err)
    if method is None:
        return text if text.startswith(str(image)) else f"{image}: {text}"
    return f"{image}: {text}" if text.startswith(f"-m {method}:") else f"{image}: -m {method}: {text}"


def method_error(err: Exception) -> str:
    """One line for an exception a method raised; anything but our own errors is a bug worth reporting."""
    from graph_passes import GraphPassError

    if isinstance(err, (SaliencyError, GraphPassError)):
        return " ".join(str(err).split())
    if isinstance(err, MemoryError):
        return "out of memory"
    return f"unexpected {type(err).__name__}: {' '.join(str(err).split())} (a bug in onnx-saliency; please report it)"


def explain_images(explainer, images: Sequence[Path], methods: Sequence[str], out: Path, *, layer, targets,
                   batch_size: int, options: dict, max_pixels: int = MAX_PIXELS, resume: bool = False,
                   on_failure: Callable[[str], None] = lambda line: None,
                   on_progress: Callable[[int], None] = lambda n: None, load: Callable | None = None,
                   write: Callable = write_image_outputs, complete: Callable = outputs_complete) -> BatchOutcome:
    """Explain `images` with every method in `methods`, `batch_size` images at a time, into `out`.

    `on_progress(k)` is called with k (image, method) units as they are done. `load(image) -> uint8 RGB`
    replaces reading the file (default ``load_image`` with `max_pixels`) and `write` replaces
    :func:`write_image_outputs` (same arguments): the scale-out runner passes its own for sources that are
    not local files and for Parquet shards, so both engines share this loop. `complete` replaces
    :func:`outputs_complete` (same arguments) as the --resume test, for a `write` that draws otherwise."""
    outcome = BatchOutcome()
    sha = explainer.model.sha256
    engine = getattr(explainer, "engine", None)
    if engine is not None:  # enough images: optimised sessions from the first one (engine.session)
        engine.expect_images(len(images))
    broken: dict[tuple, str] = {}  # (method, input shape) -> why it cannot run: not retried on later chunks

    def fail(i: int, reason: str) -> None:
        if images[i] not in outcome.failed:
            outcome.failed[images[i]] = reason
            on_failure(reason)

    def fail_method(i: int, method: str, reason: str) -> None:
        if (images[i], method) not in outcome.method_failed:
            outcome.method_failed[(images[i], method)] = reason
            on_failure(_naming(images[i], reason, method))

    def settings(method: str, i: int) -> dict | None:
        how = getattr(explainer, "run_settings", None)
        return how(method, layer, int(targets[i]), options) if how is not None else None

    for start in range(0, len(images), batch_size):
        chunk = range(start, min(start + batch_size, len(images)))
        todo = {m: [i for i in chunk if not (resume and complete(out, images[i], m, sha, settings(m, i)))]
                for m in methods}
        needed = sorted({i for idx in todo.values() for i in idx})
        outcome.resumed += [images[i] for i in chunk if i not in needed]
        on_progress(sum(len(chunk) - len(todo[m]) for m in methods))
        pictures, shapes = {}, {}
        for i in needed:
            try:
                pictures[i] = load(images[i]) if load is not None else load_image(images[i], max_pixels=max_pixels)
                shapes[i] = explainer.prepare([pictures[i]])[0].shape  # refused sizes fail here, per image
            except SaliencyError as err:
                fail(i, _naming(images[i], err))
        on_progress(sum(1 for m in methods for i in todo[m] if i not in shapes))
        results = []  # (method, [image indices], Result): all computed before anything is written
        for m in methods:
            ready = [i for i in todo[m] if i in shapes]
            for group in _same_shape(ready, shapes):
                key = (m, shapes[group[0]])
                if key in broken:
                    for i in group:
                        fail_method(i, m, broken[key])
                else:
                    found = _explain_group(explainer, m, group, pictures, layer, targets, batch_size, options,
                                           lambda i, reason, m=m: fail_method(i, m, reason), broken, key)
                    for method, idx, result in found:
                        result.settings = [settings(method, i) for i in idx]  # recorded in each sidecar
                    results += found
                on_progress(len(group))
        for m, group, result in results:
            for k, i in enumerate(group):
                write(explainer, result, k, images[i], out, options)
                outcome.outputs += 1
                flat = result.maps[k]
                if np.ptp(flat) == 0:
                    outcome.constant.append((images[i], m, float(flat.flat[0])))
        for m, group, result in results:
            outcome.notes += [(m, n) for n in result.notes if (m, n) not in outcome.notes]
        for i in needed:
            if images[i] in outcome.failed:
                continue
            lost = [m for m in methods if (images[i], m) in outcome.method_failed]
            if not lost:
                outcome.written.append(images[i])
            elif len(lost) == len(methods):  # nothing of it written, now or before: the image is skipped
                outcome.failed[images[i]] = _naming(images[i], outcome.method_failed[(images[i], lost[0])], lost[0])
    return outcome


def _same_shape(indices, shapes) -> list[list[int]]:
    """Images batch together only when they prepare to the same size (no crop: sizes may differ)."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault(shapes[i], []).append(i)
    return list(groups.values())


def _explain_group(explainer, method, group, pictures, layer, targets, batch_size, options, fail, broken,
                   key) -> list:
    """[(method, indices, Result)] for the images of `group` the method explains; `fail(i, reason)` for the rest.

    NaN/Inf and out-of-memory are told apart per image (one image at a time, on this failure path only); any
    other error means the method cannot run on images of this shape: `broken[key]` remembers it."""
    declared = explainer.options_of(method, options)
    own = {k: v for k, v in options.items() if k in declared}  # the run's options serve all its methods

    def run(idx):
        result = explainer.explain([pictures[i] for i in idx], method=method, layer=layer,
                                   target=[int(targets[i]) for i in idx], batch_size=batch_size, **own)
        if not np.isfinite(result.maps).all():
            raise NumericalError(f"non-finite values (NaN/Inf) in the {method} map, made after the graph ran "
                                 "(in the method's post-processing)")
        return result

    try:
        return [(method, group, run(group))]
    except ModelLoadError:  # onnxruntime cannot load the model: every method fails alike, the run stops
        raise
    except (NumericalError, MemoryError) as err:
        if len(group) == 1:
            fail(group[0], method_error(err))
            return []
    except Exception as err:  # noqa: BLE001 - one method's failure must not cost the other methods' outputs
        broken[key] = method_error(err)
        for i in group:
            fail(i, broken[key])
        return []
    out = []
    for i in group:
        try:
            out.append((method, [i], run([i])))
        except NumericalError as err:
            fail(i, method_error(err))
        except MemoryError:
            fail(i, "out of memory for a single image")
        except Exception as err:  # noqa: BLE001
            fail(i, method_error(err))
    return out
