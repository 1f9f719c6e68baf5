"""An audit's three outputs: the stdout table, audit.json, and a self-contained audit.html (images inline)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import cv2
import numpy as np

from .compare import AuditResult, unit_scaled
from ..output.sidecar import picture, versions
from ..output.writers import write_bytes, write_json


def _num(v, fmt=".4g") -> str:
    return "-" if v is None else format(v, fmt)


def table_lines(r: AuditResult) -> list[str]:
    a, b = r.models["a"], r.models["b"]
    out = [f"A  {a['path']}  ({a['layout']}, scores {a['score_tensor']})",
           f"B  {b['path']}  ({b['layout']}, scores {b['score_tensor']})", "", "predictions",
           "image\ttop1 A\ttop1 B\tagree\ttop5 overlap\tmax |dlogit|"]
    for p in r.predictions:
        out.append(f"{p['image']}\t{p['label_a']}\t{p['label_b']}\t{'yes' if p['top1_agree'] else 'NO'}\t"
                   f"{p['top5_overlap']:.0%}\t{p['max_abs_logit_diff']:.3g}")
    out += ["", f"structure (fuse_affine canonical graphs; activations and Grad-CAM on {r.layer_images} image(s))",
            "A node\tB node\tmatched by\tweights rel\tact rel\tact r\tGrad-CAM r"]
    for p in r.pairs:
        out.append(f"{p.a.describe()}\t{p.b.describe() if p.b else '-'}\t{p.basis}\t{_num(p.weight_diff, '.2e')}\t"
                   f"{_num(p.activation_diff, '.2e')}\t{_num(p.activation_r, '.6f')}\t{_num(p.cam_r, '.4f')}"
                   + (f"\t{p.note}" if p.note else ""))
    if r.unmatched_b:
        out.append("unmatched in B: " + ", ".join(r.unmatched_b))
    first = r.first_diverging
    out.append("first diverging layer: " + (f"{first['a_node']} <-> {first['b_node']} ({'; '.join(first['why'])})"
                                            if first else "none"))
    cam = r.first_cam_divergence
    out.append("first Grad-CAM divergence: " + (f"{cam['a_node']} <-> {cam['b_node']} (r {cam['gradcam_pearson']:.4f}"
                                                f" < {cam['threshold']:g})" if cam else "none"))
    out += ["", "explanations", "method\timage\tpearson\tssim\tIoU top-10%"]
    for method, e in r.explanations.items():
        for row in e["per_image"]:
            out.append(f"{method}\t{row['image']}\t{row['pearson']:.4f}\t{_num(row['ssim'], '.4f')}\t"
                       f"{row['iou_top10']:.3f}")
    out.append("")
    out += [f"FAIL  {f}" for f in r.failures] or ["all checks within tolerances"]
    out.append(f"verdict: {'AGREE' if r.agree else 'DIFFER'}")
    return out


def _png(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""


def difference_picture(a: np.ndarray, b: np.ndarray, signed: bool) -> np.ndarray:
    """A - B after scaling both alike (min-max, or / max|.| when signed), on a fixed scale: white = equal,
    red = A higher, blue = B higher, full colour = a difference of the whole range."""
    v = np.clip(unit_scaled(a, signed) - unit_scaled(b, signed), -1, 1)
    fade = 1.0 - np.abs(v)
    rgb = np.stack([np.where(v < 0, fade, 1.0), fade, np.where(v < 0, 1.0, fade)], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)


def html_page(r: AuditResult) -> str:
    e = html.escape
    verdict = "AGREE" if r.agree else "DIFFER"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>onnx-saliency audit: {verdict}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}.bad{background:#fdd}"
             "img{image-rendering:pixelated;width:160px}figure{display:inline-block;margin:4px}"
             "figcaption{font-size:12px}</style></head><body>",
             f"<h1>Audit: {verdict}</h1><p>A: {e(r.models['a']['path'])}<br>B: {e(r.models['b']['path'])}</p>"]
    if r.failures:
        parts.append("<ul>" + "".join(f"<li class='bad'>{e(f)}</li>" for f in r.failures) + "</ul>")
    parts.append("<h2>Predictions</h2><table><tr><th>image</th><th>top-1 A</th><th>top-1 B</th><th>top-5 overlap"
                 "</th><th>max |Δ logit|</th></tr>")
    for p in r.predictions:
        cls = "" if p["top1_agree"] else " class='bad'"
        parts.append(f"<tr{cls}><td>{e(p['image'])}</td><td>{e(p['label_a'])}</td><td>{e(p['label_b'])}</td>"
                     f"<td>{p['top5_overlap']:.0%}</td><td>{p['max_abs_logit_diff']:.3g}</td></tr>")
    parts.append("</table><h2>Layers side by side</h2><table><tr><th>A node</th><th>B node</th><th>matched by</th>"
                 "<th>weights rel Δ</th><th>activations rel Δ</th><th>activation r</th><th>Grad-CAM r</th></tr>")
    for p in r.pairs:
        cls = " class='bad'" if p.diverges(r.tolerances) else ""
        parts.append(f"<tr{cls}><td>{e(p.a.describe())}</td><td>{e(p.b.describe()) if p.b else '-'}</td>"
                     f"<td>{p.basis}</td><td>{_num(p.weight_diff, '.2e')}</td><td>{_num(p.activation_diff, '.2e')}"
                     f"</td><td>{_num(p.activation_r, '.6f')}</td><td>{_num(p.cam_r, '.4f')}</td></tr>")
    parts.append("</table>")
    if r.first_diverging:
        parts.append(f"<p>First diverging layer: <b>{e(r.first_diverging['a_node'])}</b> ↔ "
                     f"<b>{e(str(r.first_diverging['b_node']))}</b>: {e('; '.join(r.first_diverging['why']))}</p>")
    parts.append("<h2>Explanations</h2>")
    for i, name in enumerate(r.images):
        parts.append(f"<h3>{e(name)}</h3><div>")
        if r.display is not None:
            parts.append(f"<figure><img src='{_png(r.display[i])}'><figcaption>input</figcaption></figure>")
        for method, (maps_a, maps_b, signed) in r.maps.items():
            row = r.explanations[method]["per_image"][i]
            disp = None if r.display is None or r.display[i].shape[:2] != maps_a[i].shape else r.display[i]
            for label, img in ((f"{method} A", picture(disp, maps_a[i], signed)),
                               (f"{method} B", picture(disp, maps_b[i], signed)),
                               (f"A − B (r {row['pearson']:.4f}, SSIM {_num(row['ssim'], '.3f')}, "
                                f"IoU {row['iou_top10']:.2f})", difference_picture(maps_a[i], maps_b[i], signed))):
                parts.append(f"<figure><img src='{_png(img)}'><figcaption>{e(label)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_audit(r: AuditResult, out: Path) -> tuple[Path, Path]:
    data = r.to_json()
    data["versions"] = versions()
    json_path = write_json(Path(out) / "audit.json", data)
    html_path = write_bytes(Path(out) / "audit.html", html_page(r).encode("utf-8"))
    return json_path, html_path
