"""The public API: Explainer(path).explain(inputs, method=...) -> Result, numpy in, numpy out."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .engine import Engine
from .errors import SaliencyError
from .intake.labels import load_labels
from .intake.layers import Layer, candidate_layers, resolve_layer
from .methods import Result, get_method
from .methods.base import Request
from .methods.options import check_options
from .intake.model import LoadedModel, load_model
from .intake.preprocess import PRESETS, Preprocessing, load_image, prepare
from .models import label_names


class Explainer:
    """Explain one ONNX classifier. Sessions are cached per rewritten graph, least recently used dropped first
    once they would exceed the engine's memory budget; rewritten graphs are also cached on disk (`cache`)."""

    def __init__(self, path, preset: str | None = None, provider: str = "cpu", threads: int | None = None,
                 labels=None, fuse_affine: bool = False, cache=None, optimize="auto", **preprocessing_overrides):
        """cache: a folder for rewritten graphs (engine.cache), None for the default ($ONNX_SALIENCY_CACHE, else
        the user's cache folder), False for none. optimize: onnxruntime's graph optimisation, "auto" (after a
        graph's first few images, see engine.session), True (from the first image) or False (never)."""
        from .engine.cache import FileDigests, default_cache_dir

        check_threads(threads)
        folder = default_cache_dir() if cache is None else cache
        digests = None if folder is False or folder is None else FileDigests(folder)
        self.model: LoadedModel = load_model(path, fuse_affine=fuse_affine, digests=digests)
        self.engine = Engine(self.model, provider=provider, threads=threads, optimize=optimize)
        self.use_cache(folder if folder is not None else False)
        pre = self.model.preprocessing()
        self.preprocessing: Preprocessing = pre.with_overrides(preset=preset, **preprocessing_overrides)
        # what was chosen for the user without a word from them or the model: said on stderr and in sidecars
        self.assumptions: list[str] = []
        self.assumptions += self.model.notes
        if preset is None and _preset_assumed(self.model):
            p = self.preprocessing
            sizes = f"resize {p.resize} ({p.resize_mode}), crop {p.crop}" if p.resize_mode != "none" else "no resize"
            self.assumptions.append(
                f"{self.model.path.name} is not a known model and its metadata names no preset: assuming "
                f"torchvision preprocessing (RGB, pixel/255, ImageNet mean and std; {sizes}); pass --preset "
                f"({', '.join(PRESETS)}) or store onnx_saliency.preset in the model if it was trained otherwise")
        if labels is not None:
            self.model.labels = load_labels(labels)
        elif self.model.labels is None:
            self.model.labels = label_names(self.model.known)

    @classmethod
    def from_loaded(cls, model: LoadedModel, preprocessing: Preprocessing, provider: str = "cpu",
                    threads: int | None = None, optimize="auto") -> "Explainer":
        """An Explainer over a model loaded elsewhere (a scale-out actor gets it from the driver, not the file)."""
        check_threads(threads)
        self = cls.__new__(cls)
        self.model = model
        self.engine = Engine(model, provider=provider, threads=threads, optimize=optimize)
        self.preprocessing = preprocessing
        return self

    def use_cache(self, folder=None, max_bytes: int | None = None) -> None:
        """Keep rewritten graphs in `folder` (None: the default folder; False: no cache), so the next process
        that explains this model skips rewriting (see onnx_saliency.engine.cache)."""
        from .engine.cache import DEFAULT_MAX_BYTES, GraphCache, default_cache_dir

        folder = default_cache_dir() if folder is None else folder
        self.engine.graph_source = None if folder is False or folder is None else GraphCache(
            folder, self.model.sha256, DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)

    # --- introspection ----------------------------------------------------------------------------------
    def layers(self) -> list[Layer]:
        return candidate_layers(self.model)

    def resolve_layer(self, spec: str | None) -> str:
        return resolve_layer(self.model, spec)

    # --- inputs -----------------------------------------------------------------------------------------
    def prepare(self, inputs) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (batch in the canonical NCHW layout, display images uint8 RGB or None for float input)."""
        if isinstance(inputs, np.ndarray) and inputs.dtype == np.float32 and inputs.ndim == 4:
            return self._check_float_batch(inputs), None
        if isinstance(inputs, (str, Path)) or (isinstance(inputs, np.ndarray) and inputs.ndim == 3):
            inputs = [inputs]
        images = [load_image(i) if isinstance(i, (str, Path)) else _as_uint8(i) for i in inputs]
        batch, display = prepare(images, self.preprocessing)
        return self._check_float_batch(batch, from_images=True), display

    def _check_float_batch(self, x: np.ndarray, from_images: bool = False) -> np.ndarray:
        m = self.model
        if not from_images and m.layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)  # the user's array is in the original model's layout
        expected = (m.channels, *m.input_hw)
        if x.shape[1] != expected[0] or any(e is not None and e != d for e, d in zip(expected[1:], x.shape[2:])):
            want = "x".join("?" if d is None else str(d) for d in expected)
            got = x.shape if m.layout == "NCHW" or from_images else x.transpose(0, 2, 3, 1).shape
            raise SaliencyError(f"input array has shape {tuple(got)}; {m.path.name} expects (N, {want}) "
                                f"in {m.layout if not from_images else 'NCHW'} layout")
        if not np.isfinite(x).all():
            raise SaliencyError("input array contains NaN or Inf")
        return np.ascontiguousarray(x, np.float32)

    def targets(self, target, n: int) -> np.ndarray:
        """None/'top1' -> -1 (resolved in-graph); an int, a label name, or a list of those per image."""
        if target is None or (isinstance(target, str) and target.lower() in ("top1", "top-1", "auto")):
            return np.full(n, -1, np.int64)
        items = list(target) if isinstance(target, (list, tuple, np.ndarray)) else [target] * n
        if len(items) != n:
            raise SaliencyError(f"--target: {len(items)} targets for {n} images")
        return np.array([self._class_index(t) for t in items], np.int64)

    def _class_index(self, t) -> int:
        # ASCII digits only: str.isdigit() also accepts '²', which int() then refuses
        if isinstance(t, (int, np.integer)) or (isinstance(t, str) and re.fullmatch(r"-?[0-9]+", t.strip())):
            i = int(t)
            if not 0 <= i < self.model.num_classes and i != -1:
                raise SaliencyError(f"--target {t}: class index out of range 0..{self.model.num_classes - 1}")
            return i
        labels = [str(label).lower() for label in (self.model.labels or [])]
        if str(t).lower() in labels:
            return labels.index(str(t).lower())
        known = self.model.known
        if not labels and known and known.get("labels") == "imagenet":
            # ImageNet class names are not shipped: no list we may copy (see models/__init__.py)
            raise SaliencyError(f"--target {t!r}: {known['name']} is an ImageNet-1k model, but onnx-saliency "
                                "ships no ImageNet class names; pass --labels FILE with the 1000 names in "
                                "class-index order (a text file, one name per line, such as imagenet_classes.txt "
                                "in the project's test data, shared/labels/; or an imagenet_class_index.json), "
                                "or give the class index")
        raise SaliencyError(f"--target {t!r}: not a class index and not a known label"
                            + ("" if labels else " (the model has no labels; pass --labels FILE)"))

    # --- explaining -------------------------------------------------------------------------------------
    def explain(self, inputs, method: str = "gradcam", layer="auto", target=None, batch_size: int = 32,
                **options) -> Result:
        m = get_method(method)
        check_options([m], options)  # a typo or a bad value fails before any work
        x, display = self.prepare(inputs)
        specs = layer if isinstance(layer, (list, tuple)) else [layer]
        layers = [self.resolve_layer(s) for s in specs] if m.uses_layer else []
        req = Request(self.engine, x, self.targets(target, len(x)), layers, options, batch_size)
        result = m.explain(req)
        result.display = display
        return result

    def check_session(self) -> None:
        """Build the plain forward session now (it is cached for the first run): a model onnxruntime cannot
        load (an opset newer than the runtime, weights contradicting the graph) fails here as one error line,
        before any image is read, rather than once per image."""
        from graph_passes import GraphPassError

        try:
            self.engine.session(*self.engine.graph())
        except GraphPassError:  # our rewrite does not apply (an exported explain graph): load the model as is
            self.engine.session(("model",), lambda canonical: canonical)

    def run_settings(self, method: str, layer, target: int, options: dict) -> dict:
        """What decides one image's map besides the model and the image: the layer as asked (layer methods
        only), the target as asked (-1 = top-1), the preprocessing and the method's options as used (given,
        else default). The sidecar records it; `explain --resume` redoes outputs whose settings differ."""
        m = get_method(method)
        specs = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        used = {}
        for name, opt in m.declared_options(options).items():
            value = opt.default if options.get(name) is None else opt.parse(options[name], m.name)
            used[name] = f"<array {list(np.shape(value))} sha256 {_digest(value)}>" if isinstance(
                value, np.ndarray) else value
        pre = self.preprocessing
        return {"layer": [str(s) for s in specs] if m.uses_layer else [], "target": int(target),
                "preprocessing": vars(pre) if hasattr(pre, "__dict__") else str(pre), "options": used}

    @staticmethod
    def options_of(method: str, given: dict | None = None) -> dict:
        """name -> Option the method declares (for callers sharing one options dict among methods)."""
        return get_method(method).declared_options(given or {})

    def predict(self, inputs, batch_size: int = 32) -> np.ndarray:
        x, _ = self.prepare(inputs)
        return self.engine.forward(x, batch_size)[self.model.score_tensor]


def _digest(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


MAX_THREADS = 1024  # onnxruntime starts every thread up front: a typo such as 100000 hangs the machine


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or not 1 <= threads <= MAX_THREADS):
        raise SaliencyError(f"--threads {threads}: expected a whole number from 1 to {MAX_THREADS}")


def _preset_assumed(model: LoadedModel) -> bool:
    """True when neither the model's metadata nor the manifest says how to normalise its input."""
    if any(k.startswith("onnx_saliency.") for k in model.metadata):
        return "onnx_saliency.preset" not in model.metadata
    return model.known is None


def _as_uint8(img) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise SaliencyError(f"image arrays must be uint8 HxWx3 RGB, got {img.dtype} {img.shape}")
    return img
