"""Explaining a folder of images: a bad image is reported and skipped, the others are written.

Per-image failures (unreadable or refused image, NaN/Inf for that image) are collected in
:attr:`BatchOutcome.failed` and the run goes on; anything else (a bad option, a model or method that cannot
run, an output that cannot be written) is raised, because it would fail for every image alike. Within a
chunk every method runs before anything is written, so such an error in the first chunk leaves nothing on
disk. With ``resume``, (image, method) pairs whose outputs are complete (:func:`report.outputs_complete`)
are not recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NumericalError, SaliencyError
from ..intake.preprocess import MAX_PIXELS, load_image
from .sidecar import outputs_complete, write_image_outputs


class PartialFailure(SaliencyError):
    """Some images were skipped; the rest were written. The CLI exits 1 (usage and model errors exit 2)."""

    exit_code = 1


@dataclass
class BatchOutcome:
    written: list[Path] = field(default_factory=list)        # every requested method written now
    resumed: list[Path] = field(default_factory=list)        # everything already complete (--resume)
    failed: dict[Path, str] = field(default_factory=dict)    # image -> the one-line reason
    constant: list[tuple[Path, str, float]] = field(default_factory=list)  # (image, method, value)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (method, note), each once

    def raise_for_failures(self, total: int) -> None:
        if self.failed:
            names = ", ".join(p.name for p in self.failed)
            raise PartialFailure(f"{len(self.failed)} of {total} image(s) failed and were skipped: {names}")


def _naming(image: Path, err: Exception, method: str | None = None) -> str:
    text = str(err)
    where = str(image) if method is None else f"{image}: -m {method}"
    return text if method is None and text.startswith(str(image)) else f"{where}: {text}"


def explain_images(explainer, images: Sequence[Path], methods: Sequence[str], out: Path, *, layer, targets,
                   batch_size: int, options: dict, max_pixels: int = MAX_PIXELS, resume: bool = False,
                   on_failure: Callable[[str], None] = lambda line: None,
                   on_progress: Callable[[int], None] = lambda n: None, load: Callable | None = None,
                   write: Callable = write_image_outputs) -> BatchOutcome:
    """Explain `images` with every method in `methods`, `batch_size` images at a time, into `out`.

    `load(image) -> uint8 RGB` replaces reading the file (default ``load_image`` with `max_pixels`) and
    `write` replaces :func:`write_image_outputs` (same arguments): the scale-out runner passes its own for
    sources that are not local files and for Parquet shards, so both engines share this loop."""
    outcome = BatchOutcome()
    sha = explainer.model.sha256

    def fail(i: int, reason: str) -> None:
        if images[i] not in outcome.failed:
            outcome.failed[images[i]] = reason
            on_failure(reason)

    for start in range(0, len(images), batch_size):
        chunk = range(start, min(start + batch_size, len(images)))
        todo = {m: [i for i in chunk if not (resume and outputs_complete(out, images[i], m, sha))] for m in methods}
        needed = sorted({i for idx in todo.values() for i in idx})
        outcome.resumed += [images[i] for i in chunk if i not in needed]
        pictures, shapes = {}, {}
        for i in needed:
            try:
                pictures[i] = load(images[i]) if load is not None else load_image(images[i], max_pixels=max_pixels)
                shapes[i] = explainer.prepare([pictures[i]])[0].shape  # refused sizes fail here, per image
            except SaliencyError as err:
                fail(i, _naming(images[i], err))
        results = []  # (method, [image indices], Result): all computed before anything is written
        for m in methods:
            ready = [i for i in todo[m] if i in pictures and images[i] not in outcome.failed]
            for group in _same_shape(ready, shapes):
                results += _explain_group(explainer, m, group, pictures, layer, targets, batch_size, options,
                                          lambda i, err, m=m: fail(i, _naming(images[i], err, m)))
        for m, group, result in results:
            for k, i in enumerate(group):
                if images[i] in outcome.failed:
                    continue  # another method failed for it: write nothing half-done for this image
                write(explainer, result, k, images[i], out, options)
                flat = result.maps[k]
                if np.ptp(flat) == 0:
                    outcome.constant.append((images[i], m, float(flat.flat[0])))
        for m, group, result in results:
            outcome.notes += [(m, n) for n in result.notes if (m, n) not in outcome.notes]
        outcome.written += [images[i] for i in needed if images[i] not in outcome.failed]
        on_progress(len(chunk))
    return outcome


def _same_shape(indices, shapes) -> list[list[int]]:
    """Images batch together only when they prepare to the same size (no crop: sizes may differ)."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault(shapes[i], []).append(i)
    return list(groups.values())


def _explain_group(explainer, method, group, pictures, layer, targets, batch_size, options, fail) -> list:
    def run(idx):
        result = explainer.explain([pictures[i] for i in idx], method=method, layer=layer,
                                   target=[int(targets[i]) for i in idx], batch_size=batch_size, **options)
        if not np.isfinite(result.maps).all():
            raise NumericalError(f"non-finite values (NaN/Inf) in the {method} map, made after the graph ran "
                                 "(in the method's post-processing)")
        return result

    try:
        return [(method, group, run(group))]
    except (NumericalError, MemoryError) as err:
        if len(group) == 1:
            fail(group[0], err if isinstance(err, SaliencyError) else SaliencyError("out of memory"))
            return []
    # Only on this failure path: one image at a time, to tell the bad images from the good ones.
    out = []
    for i in group:
        try:
            out.append((method, [i], run([i])))
        except NumericalError as err:
            fail(i, err)
        except MemoryError:
            fail(i, SaliencyError("out of memory for a single image"))
    return out
