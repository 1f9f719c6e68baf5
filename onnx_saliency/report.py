"""Writing results: per image and method an overlay PNG, the map as .npy and a JSON sidecar."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from . import __version__
from .postprocess import colorize, colorize_signed, minmax, overlay
from .writers import write_json, write_npy, write_png


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


def picture(display: np.ndarray | None, saliency: np.ndarray, signed: bool) -> np.ndarray:
    """Overlay for unsigned maps; a diverging map (blended with the photo) for signed ones."""
    if signed:
        heat = colorize_signed(saliency)
    else:
        heat = colorize(minmax(saliency[None])[0])
    if display is None:
        return heat
    return overlay(display, heat, alpha=0.5)


def sidecar(explainer, result, index: int, image: Path, options: dict) -> dict:
    m = explainer.model
    target = int(result.targets[index])
    flat = result.maps[index]
    return {
        "image": str(image),
        "model": str(m.path), "model_sha256": m.sha256,
        "method": result.method, "layers": result.layers,
        "target": {"class": target, "label": m.label(target), "score": float(result.scores[index])},
        "map": {"shape": list(flat.shape), "min": float(flat.min()), "max": float(flat.max()),
                "signed": bool(result.signed), "constant": bool(np.ptp(flat) == 0)},
        "preprocessing": vars(explainer.preprocessing) if hasattr(explainer.preprocessing, "__dict__") else str(
            explainer.preprocessing),
        "options": {k: v for k, v in {**options, **result.options}.items() if not isinstance(v, np.ndarray)},
        "notes": result.notes,
        "versions": versions(),
        "execution_provider": explainer.engine.active_provider(),
    }


def write_outputs(explainer, result, images: list[Path], out: Path, options: dict) -> None:
    display = getattr(result, "display", None)
    for i, image in enumerate(images):
        folder = out / image.stem
        write_npy(folder / f"{result.method}.npy", result.maps[i].astype(np.float32))
        write_png(folder / f"{result.method}.png",
                  picture(None if display is None else display[i], result.maps[i], result.signed))
        write_json(folder / f"{result.method}.json", sidecar(explainer, result, i, image, options))
