"""The engine: one cached onnxruntime session per rewritten graph, batched runs, numpy in and out.

A *graph key* names a rewrite of the canonical model (which tensors are exposed, which gradients are
appended and with which backward rules); building it and creating its session happens once per Explainer.

Memory: every run is split into batches that fit ``memory_budget`` bytes (default 2 GiB), estimated from
the activation shapes of one image (shape inference at the real input size; see FORWARD_SHARE); the
caller's batch size is an upper bound.

Static batch: a model whose image input has a fixed batch B (plain torch exports without dynamic axes have
B = 1) gets exactly B images per call, whatever the caller asked; a short last chunk is padded with copies of
its last image and the padding's outputs are dropped. Every method, metric and command runs through here.

Two tiers (CPU): onnxruntime's graph optimisation (fusions, the NCHWc layout that re-lays out every
convolution weight) costs more than it saves on a few images: on ResNet-50 it takes 0.12 s for Grad-CAM's graph
(0.014 s saved per image) and 0.4 s for LRP's (0.1 s saved). So a graph's first OPTIMIZE_AFTER_IMAGES images run
on a session with optimisation off (made in 0.01 s, weights shared where they lie), and the next call of the
graph gets the optimised session (from the persistent cache where there is one, see engine.optimized). A caller
that knows it will run more images says so (expect_images) and gets the optimised session at once. Maps from the
two tiers agree to float rounding; the tier depends on the images run, never on the cache's state, so the same
command gives the same bits with, without and after a cache.

Numerics: a NaN/Inf in any output is traced, on that failure path only, to the first node that produces
it, by re-running the failing image with every intermediate tensor exposed.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
import threading
from collections.abc import Callable, Iterable

import numpy as np
import onnx

import graph_passes as gp
from graph_passes._graph import (clone, has_derived, materialize, ort_model, placeholder_keys, placeholder_ref,
                                 store_for)

from ..errors import ModelLoadError, SaliencyError, UnsupportedModelError
from ..intake.model import LoadedModel, release_freed_memory
from .memory import DEFAULT_MEMORY_BUDGET, FORWARD_SHARE, activation_bytes
from .numerics import check_finite, first_nonfinite_node
from .providers import import_onnxruntime, providers_for, session_options

PLAIN_KEY = ("vjp", (), (), "plain", "targets")  # Engine.graph() with no arguments: scores and target seed


def ort_message(err: Exception) -> str:
    """onnxruntime's exception text without its '[ONNXRuntimeError] : 1 : FAIL :' head and the C++ source
    location and signature it puts before the sentence that says what is wrong."""
    import re

    text = " ".join(str(err).split())
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    text = re.sub(r"^\S+\.(?:h|cc|cpp):\d+\s+.*?\)\s+(?=[A-Z])", "", text)  # '/src/x.h:46 void f(...) '
    return text or type(err).__name__

RULE_SETS = {"plain": None, "guided": gp.vjp.GUIDED}
OPTIMIZE_AFTER_IMAGES = 8  # break-even on ResNet-50: LRP 4-5 images, Grad-CAM about 10 (see the docstring)


class Engine:
    def __init__(self, model: LoadedModel, provider: str = "cpu", threads: int | None = None, optimize="auto"):
        """optimize: "auto" (a graph's first OPTIMIZE_AFTER_IMAGES images unoptimised, see the module
        docstring), True (optimised sessions from the first image) or False (never optimised)."""
        if optimize not in ("auto", True, False):
            raise SaliencyError(f"optimize={optimize!r}: expected 'auto', True or False")
        self.model = model
        self.provider = provider
        self._providers = providers_for(provider)
        self.threads = threads
        self._sessions: OrderedDict[tuple, tuple] = OrderedDict()  # least recently used first
        self.session_bytes: dict[tuple, int] = {}  # estimated memory of each cached session (see session())
        self.evictions = 0
        self._weight_keys: dict[tuple, set] = {}  # placeholder keys each cached session's graph uses
        self._lock = threading.Lock()
        self.calls = 0  # session.run calls, for batching checks
        self.memory_budget = DEFAULT_MEMORY_BUDGET
        self.batch_limits: dict[tuple, tuple[int, int]] = {}  # (asked, backward) -> (fitted, bytes per image)
        self._per_image: dict[tuple, int] = {}
        # images a graph runs unoptimised before its optimised session (0: none; inf: always unoptimised)
        self.optimize_after = {"auto": OPTIMIZE_AFTER_IMAGES, True: 0, False: float("inf")}[optimize]
        self.expected_images = 0  # images the caller will run (expect_images): optimise at once when enough
        self._unoptimized: dict[tuple, int] = {}  # graph key -> images its unoptimised session has run
        # Where rewritten graphs come from before they are built here: anything with load(key) -> bytes | None
        # and save(key, bytes). Scale-out ships the driver's graphs to its actors through it (scale.graphs);
        # a persistent cache of rewritten graphs plugs in at the same place.
        self.graph_source = None

    # --- sessions -------------------------------------------------------------------------------------
    def expect_images(self, n: int) -> None:
        """The caller will run about `n` images through each graph: with enough of them, every session is the
        optimised one from the start (one tier for the whole run, see the module docstring)."""
        self.expected_images = max(0, int(n))

    def _unoptimized_tier(self, key: tuple, images: int = 1) -> bool:
        """Whether `images` more images of graph `key` still run on its unoptimised session."""
        return (self.provider == "cpu" and self.optimize_after > 0 and self.expected_images < self.optimize_after
                and self._unoptimized.get(key, 0) + images <= self.optimize_after)

    def session(self, key: tuple, build: Callable[[onnx.ModelProto], onnx.ModelProto]):
        """The cached (session, output names, rebuild) for the graph `build(canonical)` identified by `key`.

        The rewritten graph is not kept: its large weights are placeholders for the model's weight store,
        handed to onnxruntime as shared OrtValues (never copied or serialised), and the rest is rebuilt by
        `rebuild()` where a diagnosis needs it (the NaN locator). Sessions are kept least-recently-used first
        within `memory_budget` (see session_bytes): many methods on one Explainer never hold more."""
        with self._lock:
            if key in self._sessions:
                if not self._sessions[key][0].unoptimized or self._unoptimized_tier(key):
                    self._sessions.move_to_end(key)
                    return self._sessions[key]
                self._drop(key)  # its images are enough: the optimised session from now on
            import_onnxruntime()  # not installed: said before any rewrite
            source = self.graph_source
            light = self._unoptimized_tier(key)
            optimizing = not light and self.provider == "cpu" and hasattr(source, "load_optimized")
            found = self._optimized_session(key, build, source) if optimizing else None
            if found is not None:
                return found
            data = source.load(key) if source is not None else None
            built = data is None
            if built:
                proto = build(self.model.canonical)
                data = proto.SerializeToString()
                if source is not None:
                    # what leaves this engine holds its derived weights itself; the model's own stay placeholders
                    source.save(key, data if not has_derived(proto) else
                                materialize(proto, keep=self._own_weight).SerializeToString())
            else:
                proto = onnx.load_from_string(data)
            if optimizing:  # onnxruntime optimises it once, into the cache, and this run maps what it saved
                from . import optimized

                self._evict_for(copied_weight_bytes(proto, self.model.weights))  # the saving session's room
                optimized.save(source, key, clone(proto), self.model.weights, session_options(self.threads))
                found = self._optimized_session(key, build, source, just_saved=True)
                if found is not None:
                    if built:
                        release_freed_memory()
                    return found
            keys = placeholder_keys(proto)
            copied = 0 if light else copied_weight_bytes(proto, self.model.weights)
            sess, cost = self._new_session(key, proto, session_options(self.threads, optimized=not light), copied,
                                           optimized=not light)
            if built:  # the rewrite's transient copies and graph-surgeon's reference cycles
                release_freed_memory()
            return self._keep(key, sess, cost, keys, build, unoptimized=light)

    def _new_session(self, key, proto: onnx.ModelProto, opts, copied: int, optimized: bool = True):
        """A session of `proto` (edited: its placeholders resolved), room made for it; (session, its cost).
        optimized=False: `opts` turn graph optimisation off (then no weight is copied, see ort_model)."""
        ort = import_onnxruntime()
        data, shared = ort_model(proto, opts, self.model.weights, optimized=optimized)
        cost = len(data) + copied
        del proto
        self._evict_for(cost)
        try:
            sess = ort.InferenceSession(data, opts, providers=self._providers)
        except Exception as err:  # onnxruntime's Fail, InvalidGraph, NotImplemented...: one line
            del data
            raise self._load_error(key, err) from None
        sess.shared_weights = shared  # onnxruntime reads their memory: alive as long as the session
        return sess, cost

    def _keep(self, key, sess, cost: int, keys: set, build, unoptimized: bool = False):
        rebuild = functools.partial(build, self.model.canonical)
        sess.unoptimized = unoptimized
        sess.graph_key, sess.graph_build = key, build  # run_session makes the optimised session from them
        self._sessions[key] = (sess, [o.name for o in sess.get_outputs()], rebuild)
        self.session_bytes[key] = cost
        self._weight_keys[key] = keys
        return self._sessions[key]

    def _optimized_session(self, key, build, source, just_saved: bool = False):
        """The session of onnxruntime's optimised graph for `key` saved in the cache by an earlier process
        (engine.optimized), made with optimisation off; None when there is none or it does not load."""
        from . import optimized

        hit = source.load_optimized(optimized.cache_key(key), count=not just_saved)  # a hit: an earlier run's
        if hit is None:
            return None
        graph, weights_file = hit
        try:
            proto = optimized.load(onnx.load_from_string(graph), weights_file, self.model.weights,
                                   weights_file.stem)
        except Exception:  # noqa: BLE001 - an entry this process cannot use (a weight it lacks) is rebuilt
            return None
        keys = placeholder_keys(proto)
        # what onnxruntime made of the weights is mapped from the entry's weight file; nothing is copied
        own = sum(self.model.weights.arrays[k].nbytes for k in keys if k.startswith("derived/optimized/"))
        try:  # optimised when it was saved
            sess, cost = self._new_session(key, proto, session_options(self.threads, optimized=False), own,
                                           optimized=False)
        except UnsupportedModelError:
            self.model.weights.drop(keys)
            return None
        return self._keep(key, sess, cost, keys, build)

    def _load_error(self, key: tuple, err: Exception) -> UnsupportedModelError:
        """The error for a graph onnxruntime refused: ModelLoadError when the model itself does not load
        (then every method fails alike and a run stops; tried on this failure path only, so a run never
        builds a session it does not use), else an error for this graph alone."""
        name = self.model.path.name
        model_fails = key == PLAIN_KEY
        if not model_fails:
            try:
                ort = import_onnxruntime()
                opts = session_options(self.threads, optimized=False)
                data, _ = ort_model(clone(self.model.canonical), opts, self.model.weights, optimized=False)
                ort.InferenceSession(data, opts, providers=self._providers)
            except Exception as plain:  # noqa: BLE001 - onnxruntime's errors have no common base
                model_fails, err = True, plain
        if model_fails:
            return ModelLoadError(f"{name}: onnxruntime cannot load the model ({ort_message(err)})")
        return UnsupportedModelError(f"{name}: onnxruntime cannot load its {key[0]} graph ({ort_message(err)})")

    def _own_weight(self, key: str) -> bool:
        return self.model.weights is not None and key in self.model.weights.arrays and not key.startswith("derived/")

    def _evict_for(self, cost: int) -> None:
        """Drop least recently used sessions until `cost` more bytes fit the memory budget (or none is left)."""
        evicted = self.evictions
        while self._sessions and sum(self.session_bytes.values()) + cost > self.memory_budget:
            self._drop(next(iter(self._sessions)))
            self.evictions += 1
        if self.evictions > evicted:
            release_freed_memory()

    def _drop(self, key) -> None:
        self._sessions.pop(key)
        self.session_bytes.pop(key, None)
        self._forget_weights(key)

    def _forget_weights(self, key) -> None:
        """Derived weights only the dropped session `key` used leave the store with it."""
        keys = self._weight_keys.pop(key, set())
        if self.model.weights is not None:
            kept = placeholder_keys(self.model.canonical).union(*self._weight_keys.values())
            self.model.weights.drop(keys - kept)

    def drop_sessions(self) -> None:
        """Forget every cached session, and with it onnxruntime's copy of the weights and its arenas; the next
        call rebuilds what it needs. For long runs over many methods of a large model (benchmarks/coverage.py)."""
        with self._lock:
            for key in list(self._sessions):
                self._drop(key)
        release_freed_memory()

    def active_provider(self) -> str:
        """The provider the sessions really use (onnxruntime-gpu silently falls back to CPU)."""
        if not self._sessions:
            self.forward(np.zeros((1, self.model.channels, *self._hw()), np.float32))
        sess = next(iter(self._sessions.values()))[0]
        return sess.get_providers()[0]

    def _hw(self):
        h, w = self.model.input_hw
        return (h or 224, w or 224)

    def graph(self, expose: Iterable[str] = (), wrt: Iterable[str] = (), rules: str = "plain",
              seed: str = "targets") -> tuple:
        """Key + builder for: scores, target seed (in-graph), exposed tensors, gradients w.r.t. `wrt`.

        `seed` is "targets" (one-hot of the per-image target, resolved in-graph, -1 = top-1) or "free"
        (the caller feeds the seed tensor itself, e.g. for contrastive or soft targets).
        """
        expose, wrt = tuple(expose), tuple(wrt)
        score = self.model.score_tensor
        key = ("vjp", expose, wrt, rules, seed)

        def build(canonical):
            m = gp.expose_tensors(canonical, sorted(set(expose) | {score}))
            if seed == "targets":
                m = gp.append_target_seed(m, score)
            if wrt:
                m = gp.append_vjp(m, score, list(wrt), seed=gp.SEED if seed == "targets" else None,
                                  rules=RULE_SETS[rules])
            return m

        return key, build

    # --- running --------------------------------------------------------------------------------------
    def run(self, x: np.ndarray, targets=None, *, expose=(), wrt=(), rules="plain", seed=None,
            batch_size: int = 32, outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Run the rewritten graph over `x` (N, C, H, W) in batches; returns arrays keyed by tensor name.

        Keys: the score tensor, exposed tensors, ``grad_name(t)`` for t in `wrt`, and, with targets,
        ``target_class`` and ``target_score``.
        """
        key, build = self.graph(expose, wrt, rules, "free" if seed is not None else "targets")
        sess, names, _ = self.session(key, build)
        wanted = list(outputs) if outputs is not None else [n for n in names if n != self.model.output_name
                                                            or n == self.model.score_tensor]
        return self.run_session(sess, wanted, x, targets, seed=seed, batch_size=batch_size,
                                where=self.model.path.name)

    def run_session(self, sess, wanted: list[str], x: np.ndarray, targets=None, *, seed=None,
                    batch_size: int = 32, where: str = "", backward: bool = True) -> dict[str, np.ndarray]:
        """Feed `x` (and targets, or a free seed) to a cached session in batches that fit the memory budget;
        concatenate the `wanted` outputs, count the calls, and stop on NaN/Inf naming the node it starts at."""
        n = len(x)
        if getattr(sess, "unoptimized", False) and not self._unoptimized_tier(sess.graph_key, n):
            key = sess.graph_key  # many images: optimise first
            self._unoptimized[key] = max(self._unoptimized.get(key, 0), self.optimize_after)
            sess = self.session(key, sess.graph_build)[0]
        targets = np.full(n, -1, np.int64) if targets is None else np.asarray(targets, np.int64)
        batch_size = self.fit_batch(batch_size, x.shape[2:], backward=backward)
        results: dict[str, list] = {k: [] for k in wanted}
        for start in range(0, n, max(1, batch_size)):
            sl = slice(start, start + batch_size)
            feeds = {self.model.input_name: np.ascontiguousarray(x[sl], dtype=np.float32)}
            if seed is not None:
                feeds[self.model.score_tensor + "__seed"] = np.ascontiguousarray(seed[sl], dtype=np.float32)
            else:
                feeds[gp.TARGETS_INPUT] = targets[sl]
            values = self._call(sess, wanted, feeds)
            for k, v in zip(wanted, values):
                results[k].append(v)
        out = {k: np.concatenate(v) if v and v[0].ndim else np.asarray(v) for k, v in results.items()}
        check_finite(out, where or self.model.path.name, self.nonfinite_locator(sess, x, targets, seed))
        return out

    def _call(self, sess, wanted: list[str], feeds: dict[str, np.ndarray]) -> list:
        """One session call; a chunk shorter than the model's static batch is padded and the padding dropped."""
        real = len(next(iter(feeds.values())))
        feeds = pad_feeds(feeds, self.model.batch)
        try:
            values = sess.run(wanted, feeds)
        except Exception as err:  # onnxruntime's message spans lines; the later ones say what is wrong
            raise SaliencyError(f"onnxruntime failed on {self.model.path.name}: {err}") from err
        self.calls += 1
        if getattr(sess, "unoptimized", False):
            self._unoptimized[sess.graph_key] = self._unoptimized.get(sess.graph_key, 0) + real
        padded = len(next(iter(feeds.values())))
        if padded == real:
            return values
        return [v[:real] if v.ndim and len(v) == padded else v for v in values]

    def forward(self, x: np.ndarray, batch_size: int = 32, targets=None) -> dict[str, np.ndarray]:
        return self.run(x, targets, batch_size=batch_size)

    # --- memory ---------------------------------------------------------------------------------------
    def bytes_per_image(self, hw, backward: bool = True) -> int:
        """Estimated session memory per image at input size `hw` (see FORWARD_SHARE)."""
        hw = tuple(int(d) for d in hw)
        if hw not in self._per_image:
            self._per_image[hw] = activation_bytes(self.model, hw)
        return self._per_image[hw] if backward else max(1, self._per_image[hw] // FORWARD_SHARE)

    def fit_batch(self, batch_size: int, hw=None, backward: bool = True) -> int:
        """`batch_size`, reduced so one session call stays within `memory_budget` (never below 1)."""
        batch_size = max(1, int(batch_size))
        if self.model.batch:  # the graph takes exactly this many images per call (see the module docstring)
            return self.model.batch
        per_image = self.bytes_per_image(hw or self._hw(), backward)
        fitted = max(1, min(batch_size, self.memory_budget // max(per_image, 1)))
        if fitted < batch_size:
            self.batch_limits[(batch_size, backward)] = (fitted, per_image)
        return fitted

    # --- numerical guard --------------------------------------------------------------------------------
    def nonfinite_locator(self, sess, x: np.ndarray, targets=None, seed=None):
        """A callback for :func:`check_finite`: where NaN/Inf first appears in `sess`'s graph for `x`."""

        def locate(name: str, array: np.ndarray) -> str | None:
            rebuild = next((g for s, _, g in self._sessions.values() if s is sess), None)
            if rebuild is None or array.ndim == 0 or len(array) != len(x):
                return None
            i = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])
            feeds = {self.model.input_name: np.ascontiguousarray(x[i:i + 1], np.float32)}
            if seed is not None:
                feeds[self.model.score_tensor + "__seed"] = np.ascontiguousarray(seed[i:i + 1], np.float32)
            else:
                t = np.full(len(x), -1, np.int64) if targets is None else np.asarray(targets, np.int64)
                feeds[gp.TARGETS_INPUT] = t[i:i + 1]
            return first_nonfinite_node(rebuild(), pad_feeds(feeds, self.model.batch), self._providers)

        return locate


# Weights these ops read are used where they lie (mapped from the model file or shared; pre-packing is off, see
# providers.DISABLE_PREPACKING); onnxruntime's optimiser copies the others into new initializers of the session
# (Conv weights reordered to its blocked layout) and folds what is computed from weights alone (LRP's W+, W-
# and flipped transposes are nodes on the stored weight: one new initializer each).
_IN_PLACE_OPS = {"MatMul", "Gemm"}
_SHAPE_OPS = {"Shape", "Size"}


def copied_weight_bytes(model: onnx.ModelProto, fallback=None) -> int:
    """About how many bytes of weights a session of `model` (graph optimisation on) holds in memory of its own:
    weights not mapped from a file (onnxruntime copies what add_external_initializers hands it), every folded
    weight-only node's output, and the weights ops other than MatMul/Gemm read (re-laid out)."""
    size = {}
    total = 0
    for t in model.graph.initializer:
        ref = placeholder_ref(t)
        if ref is None:
            size[t.name] = len(t.raw_data) or 4 * int(np.prod(t.dims, dtype=np.int64))
            continue
        store = store_for(t, ref, fallback)
        size[t.name] = int(store.arrays[ref[1]].nbytes)
        if ref[1] not in store.files:
            total += size[t.name]
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if inputs and all(i in size for i in inputs) and node.op_type not in _SHAPE_OPS:
            for out in node.output:  # folded into a new initializer
                size[out] = max(size[i] for i in inputs)
                total += size[out]
        elif node.op_type not in _IN_PLACE_OPS:
            total += sum(size[i] for i in inputs if i in size)
    return total


def pad_feeds(feeds: dict[str, np.ndarray], batch: int | None) -> dict[str, np.ndarray]:
    """Feeds with fewer than `batch` rows, padded to it with copies of their last row (real data: zeros could
    trip a division in the graph); unchanged when `batch` is None or already met."""
    real = len(next(iter(feeds.values())))
    if not batch or real >= batch:
        return feeds
    return {k: np.concatenate([v, np.repeat(v[-1:], batch - real, axis=0)]) for k, v in feeds.items()}
