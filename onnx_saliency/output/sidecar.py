"""Writing results: per image and method an overlay PNG, the map as .npy and a JSON sidecar.

Layout: ``OUT/<image stem>/<method>.{png,npy,json}``. Each file is written atomically (``writers``), so a
killed run leaves whole files or none; :func:`outputs_complete` is what ``explain --resume`` trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import string
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .. import __version__
from ..intake.layers import module_of_tensor
from .postprocess import DEFAULT_CLIP_PERCENTILE, figure, map_kind, render
from .writers import json_default, stale_temps, write_json, write_npy, write_png

OUTPUT_SUFFIXES = (".npy", ".png", ".json")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx-saliency": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


@dataclass(frozen=True)
class Rendering:
    """How saved pictures are drawn (postprocess.render): `clip_percentile` of |R| (signed) or of the map
    (unsigned pixel maps) where the colours saturate; `blend` signed and pixel maps onto a grey copy of the
    photo; `min_height` rows a per-image picture is upscaled to, so its title and colour bar are readable."""

    clip_percentile: float = DEFAULT_CLIP_PERCENTILE
    blend: bool = False
    min_height: int = 224


def result_kind(result) -> str:
    """'signed', 'pixel' (unsigned pixel attributions) or 'cam', from what the method returned."""
    return map_kind(bool(result.signed), getattr(result, "attributions", None) is not None)


def picture(display: np.ndarray | None, saliency: np.ndarray, signed: bool, kind: str | None = None,
            rendering: Rendering = Rendering()) -> np.ndarray:
    """The map drawn as its kind says, at its own size, without title or bar (``kind`` defaults to 'signed'
    for signed maps, else 'cam')."""
    kind = kind or ("signed" if signed else "cam")
    return render(saliency, kind, display, clip_percentile=rendering.clip_percentile, blend=rendering.blend)[0]


def picture_title(explainer, result, index: int) -> str:
    target = int(result.targets[index])
    return f"{result.method}: {explainer.model.label(target)} ({target}), score {float(result.scores[index]):.4g}"


def annotated_picture(explainer, result, index: int, rendering: Rendering = Rendering()) -> tuple[np.ndarray, dict]:
    """The per-image picture (map drawn by kind, upscaled, colour bar, title and sign convention) and what the
    sidecar records about it."""
    display = getattr(result, "display", None)
    kind = result_kind(result)
    heat, scale = render(result.maps[index], kind, None if display is None else display[index],
                         clip_percentile=rendering.clip_percentile, blend=rendering.blend)
    rgb = figure(heat, scale, picture_title(explainer, result, index), min_height=rendering.min_height)
    return rgb, {"kind": kind, "shape": list(rgb.shape[:2]), "colour_bar": scale.as_dict(),
                 "clip_percentile": rendering.clip_percentile, "blend": rendering.blend,
                 "min_height": rendering.min_height}


def sidecar(explainer, result, index: int, image: Path, options: dict, picture: dict | None = None) -> dict:
    m = explainer.model
    target = int(result.targets[index])
    flat = result.maps[index]
    return {
        "image": str(image), "output_name": output_name(image),  # the folder under --out
        "model": str(m.path), "model_sha256": m.sha256,
        "method": result.method, "layers": result.layers,
        "layer_modules": [module_of_tensor(m, t) for t in result.layers],  # torch module paths (dynamo exports)
        "target": {"class": target, "label": m.label(target), "score": float(result.scores[index])},
        "map": {"shape": list(flat.shape), "min": float(flat.min()), "max": float(flat.max()),
                "signed": bool(result.signed), "constant": bool(np.ptp(flat) == 0),
                "all_zero": bool(not flat.any())},
        **({"picture": picture} if picture is not None else {}),
        "preprocessing": vars(explainer.preprocessing) if hasattr(explainer.preprocessing, "__dict__") else str(
            explainer.preprocessing),
        "assumptions": list(getattr(explainer, "assumptions", [])),  # chosen without the user's or model's word
        # every option the method declares, as used (given or default), then what the method reports using
        "options": options_used(explainer, result, options),
        # what decides the map besides model and image, as asked: `explain --resume` compares it
        "settings": (result.settings[index] if getattr(result, "settings", None) is not None else None),
        "notes": result.notes,
        "versions": versions(),
        "execution_provider": explainer.engine.active_provider(),
    }


def options_used(explainer, result, options: dict) -> dict:
    """Every option the method declares, as used (given, else its default; an array only by its shape), then
    what the method reports using (a resolved composite, say). Options of the run's other methods are left out."""
    used = {}
    for name, opt in explainer.options_of(result.method, options).items():
        value = opt.default if options.get(name) is None else opt.parse(options[name], result.method)
        used[name] = f"<array {list(value.shape)}>" if isinstance(value, np.ndarray) else value
    return {**used, **{k: v for k, v in result.options.items() if not isinstance(v, np.ndarray)}}


def write_outputs(explainer, result, images: list[Path], out: Path, options: dict) -> None:
    for i, image in enumerate(images):
        write_image_outputs(explainer, result, i, image, out, options)


def output_paths(out: Path, image: Path, method: str) -> list[Path]:
    return [out / output_name(image) / f"{method}{suffix}" for suffix in OUTPUT_SUFFIXES]


_ESCAPE_KEEPS = frozenset(string.ascii_letters + string.digits + "-_ ")
MAX_NAME = 200  # bytes; file systems allow 255 per name


def output_name(image) -> str:
    """The folder an image's outputs go to, under --out: its stem when that is a plain name, else the stem's
    bytes percent-encoded (`%2E%2E` for the stem `..`, `%FF` for a byte that is not UTF-8).

    Plain: printable UTF-8, no leading dot (`.`, `..`, hidden folders), no `%`, no path separator, at most
    MAX_NAME bytes. Escaped names always hold a `%` and plain names never do, so two images never share a
    folder, and the name can never leave --out. The sidecar records the image's path and this name."""
    stem = Path(str(image)).stem
    raw = os.fsencode(stem)
    plain = (stem and stem.isprintable() and not stem.startswith(".") and not set(stem) & set("%/\\:")
             and len(raw) <= MAX_NAME)
    if plain:
        return stem
    name = "".join(chr(b) if chr(b) in _ESCAPE_KEEPS else f"%{b:02X}" for b in raw) or "%"
    if len(name) > MAX_NAME:  # the escaped form grows up to 3x: cut it and keep it unique by a digest
        name = name[:MAX_NAME - 20] + "%~" + hashlib.sha256(raw).hexdigest()[:16]
    return name


def write_image_outputs(explainer, result, i: int, image: Path, out: Path, options: dict,
                        rendering: Rendering = Rendering()) -> None:
    """The map, picture and sidecar of image `i` of `result`; the JSON goes last, so it marks completion."""
    npy, png, sidecar_path = output_paths(out, image, result.method)
    for target in (npy, png, sidecar_path):
        for stale in stale_temps(target):  # left by a run killed between writing and renaming
            stale.unlink(missing_ok=True)
    write_npy(npy, result.maps[i].astype(np.float32))
    rgb, about = annotated_picture(explainer, result, i, rendering)
    write_png(png, rgb)
    write_json(sidecar_path, sidecar(explainer, result, i, image, options, about))


def outputs_complete(out: Path, image: Path, method: str, model_sha256: str, settings: dict | None = None,
                     rendering: Rendering | None = None) -> bool:
    """True when the three outputs of (image, method) exist, load, agree on the map shape, and the sidecar
    names this method and model and, where `settings` is given, was made with those settings (layer, target,
    preprocessing, options: `Explainer.run_settings`) and, where `rendering` is given, its picture was drawn
    that way; outputs made otherwise are redone.
    """
    npy, png, sidecar_path = output_paths(out, image, method)
    try:
        meta = json.loads(sidecar_path.read_text(encoding="utf-8"))
        saliency = np.load(npy, allow_pickle=False)
        picture_hw = _png_size(png)
    except (OSError, ValueError, EOFError):
        return False
    if not isinstance(meta, dict) or meta.get("method") != method or meta.get("model_sha256") != model_sha256:
        return False
    if settings is not None and meta.get("settings") != json.loads(json.dumps(settings, default=json_default)):
        return False
    shape = meta.get("map", {}).get("shape") if isinstance(meta.get("map"), dict) else None
    pic = meta.get("picture") if isinstance(meta.get("picture"), dict) else {}
    drawn = pic.get("shape")
    if rendering is not None and (pic.get("clip_percentile"), pic.get("blend"), pic.get("min_height")) != (
            rendering.clip_percentile, rendering.blend, rendering.min_height):
        return False
    return (saliency.ndim == 2 and saliency.dtype == np.float32 and list(saliency.shape) == shape
            and isinstance(drawn, list) and picture_hw == tuple(drawn) and bool(np.isfinite(saliency).all()))


def _png_size(path: Path) -> tuple[int, int] | None:
    import cv2

    from ..intake.preprocess import _decoder_messages_silenced

    with _decoder_messages_silenced():  # libpng complains about a damaged file on stderr by itself
        img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)  # decodes it all: catches truncation
    return None if img is None else img.shape[:2]
