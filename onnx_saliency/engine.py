"""The engine: one cached onnxruntime session per rewritten graph, batched runs, numpy in and out.

A *graph key* names a rewrite of the canonical model (which tensors are exposed, which gradients are
appended and with which backward rules); building it and creating its session happens once per Explainer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
import onnx

import graph_passes as gp

from .errors import NumericalError, SaliencyError
from .model import LoadedModel

RULE_SETS = {"plain": None, "guided": gp.vjp_rules.GUIDED}


def providers_for(provider: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise SaliencyError("--provider cuda: onnxruntime-gpu with CUDA is not installed "
                                "(pip install 'onnx-saliency[gpu]' instead of [cpu])")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise SaliencyError(f"--provider {provider!r}: expected 'cpu' or 'cuda'")


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise SaliencyError("onnxruntime is not installed: pip install 'onnx-saliency[cpu]' "
                            "(or [gpu] for onnxruntime-gpu)") from err
    return ort


class Engine:
    def __init__(self, model: LoadedModel, provider: str = "cpu", threads: int | None = None):
        self.model = model
        self.provider = provider
        self._providers = providers_for(provider)
        self.threads = threads
        self._sessions: dict[tuple, tuple] = {}
        self._lock = threading.Lock()
        self.calls = 0  # session.run calls, for batching checks

    # --- sessions -------------------------------------------------------------------------------------
    def session(self, key: tuple, build: Callable[[onnx.ModelProto], onnx.ModelProto]):
        """The cached (session, output names) for the graph `build(canonical)` identified by `key`."""
        with self._lock:
            if key not in self._sessions:
                ort = import_onnxruntime()
                graph = build(self.model.canonical)
                opts = ort.SessionOptions()
                if self.threads:
                    opts.intra_op_num_threads = self.threads
                    opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=self._providers)
                self._sessions[key] = (sess, [o.name for o in sess.get_outputs()], graph)
            return self._sessions[key]

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
        n = len(x)
        if targets is None:
            targets = np.full(n, -1, np.int64)
        results: dict[str, list] = {k: [] for k in wanted}
        for start in range(0, n, max(1, batch_size)):
            sl = slice(start, start + batch_size)
            feeds = {self.model.input_name: np.ascontiguousarray(x[sl], dtype=np.float32)}
            if seed is not None:
                feeds[self.model.score_tensor + "__seed"] = np.ascontiguousarray(seed[sl], dtype=np.float32)
            else:
                feeds[gp.TARGETS_INPUT] = np.asarray(targets[sl], np.int64)
            try:
                values = sess.run(wanted, feeds)
            except Exception as err:
                raise SaliencyError(f"onnxruntime failed on {self.model.path.name}: {str(err).splitlines()[0]}") from err
            self.calls += 1
            for k, v in zip(wanted, values):
                results[k].append(v)
        out = {k: np.concatenate(v) if v and v[0].ndim else np.asarray(v) for k, v in results.items()}
        check_finite(out, self.model.path.name)
        return out

    def forward(self, x: np.ndarray, batch_size: int = 32, targets=None) -> dict[str, np.ndarray]:
        return self.run(x, targets, batch_size=batch_size)


def check_finite(arrays: dict[str, np.ndarray], where: str) -> None:
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise NumericalError(f"{where}: non-finite values (NaN/Inf) in {name!r}")
