"""`explain --report`: one self-contained HTML page per run, the kind of page a user attaches to an audit.

Everything is inline (pictures as data: URIs, CSS in a <style> element, no script, no external link), so the
page opens anywhere, offline, and stays whole when mailed. It shows the settings, every warning, what
canonicalisation rewrote, then for every image the input as the model saw it and every method's saved picture
(read back from the run's outputs, so it is exactly what was written) with its target, score and notes, and
for LRP methods the conservation table per layer (relevance arriving at and leaving each node).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sidecar import output_paths
from .writers import write_bytes

REPORT_NAME = "report.html"

_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#111}
h1{font-size:1.4em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:.85em;
text-align:left;vertical-align:top}th{background:#f2f2f2}td.num{text-align:right;font-family:monospace}
tr.loss td{background:#fde8e8}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;border:1px solid #ddd;padding:4px;background:#fff}
figcaption{font-size:.8em;max-width:360px}
.warn{color:#8a4b00}.err{color:#a00000}
code,pre{font-size:.85em}
"""


@dataclass
class Entry:
    """One image x method: the saved picture (PNG bytes) and its sidecar."""

    image: str
    method: str
    png: bytes
    meta: dict


@dataclass
class Conservation:
    """An LRP method's per-layer conservation on one image: rows of conservation_table for that image."""

    image: str
    method: str
    composite: str
    start: float                          # the initial relevance (the target logit for init=logit)
    rows: list[dict] = field(default_factory=list)   # {"node", "op", "rule", "out", "in"} (floats)


@dataclass
class RunReport:
    model: str
    settings: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)                # what the methods said about their runs
    rewrite: list[str] = field(default_factory=list)
    inputs: dict[str, bytes] = field(default_factory=dict)      # image -> PNG of the input the model saw
    entries: list[Entry] = field(default_factory=list)
    conservation: list[Conservation] = field(default_factory=list)


def collect_entries(out: Path, images, methods) -> list[Entry]:
    """The saved pictures and sidecars of every (image, method) whose outputs exist under `out`."""
    entries = []
    for image in images:
        for method in methods:
            _, png, meta = output_paths(out, Path(image), method)
            if png.is_file() and meta.is_file():
                entries.append(Entry(str(image), method, png.read_bytes(), json.loads(meta.read_text("utf-8"))))
    return entries


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _num(v: float) -> str:
    return f"{v:.6g}" if np.isfinite(v) else "-"


def conservation_rows_html(c: Conservation) -> list[str]:
    e = html.escape
    parts = [f"<table class='conservation'><tr><th>node</th><th>op</th><th>rule</th><th>sum R out</th>"
             f"<th>sum R in</th><th>in/out</th><th>absorbed</th><th>by</th><th>kept of start</th></tr>"]
    for r in c.rows:
        ratio = r["in"] / r["out"] if r["out"] else float("nan")
        kept = r["in"] / c.start if c.start else float("nan")
        loss = " class='loss'" if np.isfinite(ratio) and abs(ratio - 1) > 0.05 else ""
        parts.append(f"<tr{loss}><td>{e(r['node'])}</td><td>{e(r['op'])}</td><td>{e(r['rule'])}</td>"
                     f"<td class='num'>{_num(r['out'])}</td><td class='num'>{_num(r['in'])}</td>"
                     f"<td class='num'>{_num(ratio)}</td><td class='num'>{_num(r['out'] - r['in'])}</td>"
                     f"<td>{e(str(r.get('sink', '-')))}</td><td class='num'>{_num(kept)}</td></tr>")
    parts.append("</table>")
    return parts


def report_html(r: RunReport) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>onnx-saliency report: {e(r.model)}</title><style>{_CSS}</style></head><body>",
             f"<h1>onnx-saliency explain report: {e(r.model)}</h1>",
             "<h2 id='settings'>Settings</h2><table>"]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in r.settings]
    parts.append("</table><h2 id='warnings'>Warnings and errors</h2>")
    if r.errors or r.warnings:
        parts.append("<ul>" + "".join(f"<li class='err'>error: {e(t)}</li>" for t in r.errors)
                     + "".join(f"<li class='warn'>{e(t)}</li>" for t in r.warnings) + "</ul>")
    else:
        parts.append("<p>none</p>")
    if r.notes:
        parts.append("<h2 id='notes'>Notes from the methods</h2><ul>" + "".join(f"<li>{e(t)}</li>" for t in r.notes)
                     + "</ul>")
    if r.rewrite:
        parts.append("<h2 id='rewrite'>What canonicalisation did</h2><pre>" + e("\n".join(r.rewrite)) + "</pre>")
    parts.append("<h2 id='maps'>Maps</h2>")
    images = list(dict.fromkeys([*r.inputs, *(x.image for x in r.entries)]))
    for image in images:
        parts.append(f"<h3>{e(Path(image).name)}</h3><div class='row'>")
        if image in r.inputs:
            parts.append(f"<figure><img alt='input' src='{_uri(r.inputs[image])}'>"
                         f"<figcaption>input as the model sees it<br>{e(image)}</figcaption></figure>")
        for x in (x for x in r.entries if x.image == image):
            t, m, pic = x.meta.get("target", {}), x.meta.get("map", {}), x.meta.get("picture", {})
            lines = [f"<b>{e(x.method)}</b>: target {e(str(t.get('label')))} ({t.get('class')}), "
                     f"score {_num(float(t.get('score', float('nan'))))}",
                     f"map min {_num(float(m.get('min', float('nan'))))}, max {_num(float(m.get('max', float('nan'))))}"
                     f"{', signed' if m.get('signed') else ''}; drawn as {e(str(pic.get('kind', '?')))}"]
            if x.meta.get("layers"):
                lines.append("layer " + e(", ".join(x.meta["layers"])))
            lines += [e(n) for n in x.meta.get("notes", [])]
            parts.append(f"<figure><img alt='{e(x.method)}' src='{_uri(x.png)}'><figcaption>"
                         + "<br>".join(lines) + "</figcaption></figure>")
        parts.append("</div>")
    if r.conservation:
        parts.append("<h2 id='conservation'>LRP conservation per layer</h2><p>sum R out: relevance arriving at a "
                     "node from above; sum R in: what its rule passes to its inputs; absorbed: the difference, and "
                     "by: what can hold it there (a linear layer's bias, with the folded BatchNorm shift, unless "
                     "its rule zeroes it; the stabiliser); rows whose in/out is off by more than 5 % are shaded; "
                     "kept of start: the share of the initial relevance still present below the node.</p>")
        for c in r.conservation:
            parts.append(f"<h3>{e(Path(c.image).name)}: {e(c.method)} (composite {e(c.composite)}, start "
                         f"{_num(c.start)})</h3>")
            parts += conservation_rows_html(c)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path, r: RunReport) -> Path:
    return write_bytes(path, report_html(r).encode("utf-8"))
