"""Models that ship with onnx-saliency, and a manifest of known models.

* ``DEFAULT_MODEL_PATH``: the embedded default model (a tiny CNN trained on procedurally
  generated shapes; its preprocessing contract is in its ``onnx_saliency.*`` metadata_props).
  ``onnx-saliency explain`` without a model runs on it. Rebuild it with
  ``python -m onnx_saliency.models.build_default`` (needs torch).
* ``DEFAULT_SAMPLES_DIR``: sample PNGs the default model classifies correctly, with
  ``annotations.json`` (labels and boxes in file pixels).
* ``load_manifest()`` / ``lookup(sha256)``: known models keyed by the sha256 of the file, with
  their preprocessing (preset, resize, crop, resize_mode, layout), default Grad-CAM layer and
  label set.

This module must stay free of torch; only ``build_default`` (the recipe) imports it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_PATH",
    "LABEL_SETS",
    "DEFAULT_SAMPLES_DIR",
    "MANIFEST_PATH",
    "load_manifest",
    "lookup",
    "label_names",
    "lookup_file",
    "sha256_file",
]

_HERE = Path(__file__).resolve().parent

DEFAULT_MODEL_PATH: Path = _HERE / "default" / "shapes_cnn.onnx"
DEFAULT_SAMPLES_DIR: Path = _HERE / "default" / "samples"
MANIFEST_PATH: Path = _HERE / "manifest.json"


# Class names of the manifest's label sets that may ship with the package. "imagenet" is deliberately absent:
# the ImageNet name lists at hand (the project's shared test data) come with licences that keep them out of
# the repository, so a known ImageNet model asks for --labels instead (see Explainer.targets).
LABEL_SETS = {"nsfw2": ("SFW", "NSFW")}


def label_names(entry: dict | None) -> list[str] | None:
    """The class names of a manifest entry's label set, where they ship; None otherwise."""
    names = LABEL_SETS.get((entry or {}).get("labels"))
    return list(names) if names else None


@lru_cache(maxsize=1)
def _load_manifest_cached() -> str:
    return MANIFEST_PATH.read_text(encoding="utf-8")


def load_manifest() -> dict:
    """The parsed ``manifest.json``: ``{"_about": str, "models": {sha256: entry}}``.

    Each entry has ``name, preset, resize, crop, resize_mode, layout, default_layer`` (an ONNX
    tensor name or None), ``labels`` (``"imagenet"``, ``"nsfw2"`` or ``"embedded"``: read
    ``onnx_saliency.labels`` from the model's metadata), ``output`` (``"logits"`` or
    ``"softmax"``) and ``notes``. A fresh copy is returned on every call.
    """
    return json.loads(_load_manifest_cached())


def lookup(sha256: str) -> dict | None:
    """The manifest entry for a model file's sha256 (hex, any case), or None if unknown."""
    entry = load_manifest()["models"].get(sha256.strip().lower())
    return None if entry is None else dict(entry, sha256=sha256.strip().lower())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def lookup_file(path: str | Path) -> dict | None:
    """``lookup(sha256_file(path))``."""
    return lookup(sha256_file(path))
