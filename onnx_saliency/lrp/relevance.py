"""The relevance graph: initial relevance (logit, one, contrastive, sglrp) seeded in-graph, every node's rule
compiled into one onnxruntime session, and the runner that returns relevance at any tensors."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import graph_passes as gp
from graph_passes import lrp as R
from graph_passes.fuse_affine import fuse_affine
from graph_passes._graph import summarize_nodes

from ..errors import SaliencyError, UnsupportedModelError
from .composites import Composite
from .rule_maps import resolve_composite

INITS = ("logit", "one", "contrastive", "sglrp")


def append_initial_relevance(model: onnx.ModelProto, scores: str, init: str, classes: int) -> tuple:
    """Add the initial relevance tensor (from gp.SEED, the in-graph one-hot) -> (model, its name)."""
    if init not in INITS:
        raise SaliencyError(f"--init {init!r}: expected one of {', '.join(INITS)}")
    if init == "one":
        return model, gp.SEED
    g = model.graph
    out = f"lrp_init/{init}"

    def c(name, value):
        g.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    if init == "logit":
        g.node.append(helper.make_node("Mul", [gp.SEED, scores], [out], name="lrp_init/mul"))
    elif init == "contrastive":
        # target 1, every other class -1/C  (Relevance-CAM's CLRP)
        g.node.extend([
            helper.make_node("Mul", [gp.SEED, c("lrp_init/scale", 1.0 + 1.0 / classes)], ["lrp_init/a"],
                             name="lrp_init/mul"),
            helper.make_node("Sub", ["lrp_init/a", c("lrp_init/shift", 1.0 / classes)], [out], name="lrp_init/sub")])
    else:  # sglrp: y_c * (onehot - y)
        g.node.extend([
            helper.make_node("Softmax", [scores], ["lrp_init/y"], axis=1, name="lrp_init/softmax"),
            helper.make_node("Mul", ["lrp_init/y", gp.SEED], ["lrp_init/yt"], name="lrp_init/mul"),
            helper.make_node("ReduceSum", ["lrp_init/yt", c_int(g, "lrp_init/axis", [1])], ["lrp_init/yc"],
                             keepdims=1, name="lrp_init/sum"),
            helper.make_node("Sub", [gp.SEED, "lrp_init/y"], ["lrp_init/d"], name="lrp_init/sub"),
            helper.make_node("Mul", ["lrp_init/yc", "lrp_init/d"], [out], name="lrp_init/mul2")])
    return model, out


def c_int(g, name, value):
    g.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, np.int64), name))
    return name


def build_relevance_graph(canonical: onnx.ModelProto, score: str, classes: int, at, composite: Composite,
                          init: str = "logit", expose=(), record: list | None = None) -> onnx.ModelProto:
    m = fold_affine_layers(canonical, set(expose) | set(at) | {score})
    analysis = R.analyze(m)
    rules = composite.assign(m, analysis)
    m = gp.append_target_seed(m, score)
    m, seed = append_initial_relevance(m, score, init, classes)
    try:
        return R.append_lrp(m, score, list(at), seed=seed, rules=rules, analysis=analysis, record=record)
    except gp.UnsupportedOpsError as err:
        raise UnsupportedModelError(f"LRP composite {composite.name}: no relevance rule for {len(err.nodes)} "
                                    f"node(s): {summarize_nodes(err.nodes)}") from err
    except gp.GraphPassError as err:
        raise UnsupportedModelError(f"LRP composite {composite.name}: {err}") from err


def fold_affine_layers(canonical: onnx.ModelProto, keep, log: list | None = None) -> onnx.ModelProto:
    """The graph LRP runs on: `keep` exposed as outputs, then every per-channel scale/shift folded into its layer.

    Like zennit's canonizers, LRP treats a BatchNorm as part of the linear layer before it; canonicalize folds
    BatchNormalization nodes, and this folds the other spellings of the same layer: a decomposed BatchNorm
    (tf2onnx writes per-channel Mul + Add after the Conv), a separate bias Add, a MatMul + Add head. Without it
    a Keras export's relevance differs from the torch export's of the same weights (the Adds absorb relevance
    as biases of their own). Graph outputs are never folded away, so every tensor in `keep` survives. `log`
    receives one line per folded (or kept) node."""
    produced = {o for node in canonical.graph.node for o in node.output}
    m = gp.expose_tensors(canonical, sorted(t for t in keep if t in produced))
    try:
        return fuse_affine(m, log)
    except gp.GraphPassError as err:
        raise UnsupportedModelError(f"LRP: {err}") from err


def relevance_at(engine, x: np.ndarray, targets=None, at=None, composite="epsilon-plus-flat", init: str = "logit",
                 batch_size: int = 32, rule_map=None, expose=(), low=None, high=None) -> dict:
    """Relevance at tensors `at` (default: the image input) for a batch with per-image targets (-1 = top-1).

    One onnxruntime call per batch gives logits, exposed activations and relevance. Returns
    {"relevance": {tensor: (N, ...) array}, "scores": (N, classes), "targets": (N,), "target_score": (N,),
     "start": (N,) total initial relevance, "composite": name, plus exposed tensors by name}.
    """
    model = engine.model
    comp = composite if isinstance(composite, Composite) else resolve_composite(engine, composite, rule_map,
                                                                                low, high)
    at = tuple(at) if at else (model.input_name,)
    expose = tuple(expose)
    score = model.score_tensor

    def build(canonical):
        return build_relevance_graph(canonical, score, model.num_classes, at, comp, init, expose)

    sess, names, _ = engine.session(("lrp", comp, at, init, expose), build)
    wanted = [score, gp.RESOLVED, gp.TARGET_SCORE] + [gp.grad_name(t) for t in at] + [
        t for t in expose if t != score]
    return run_relevance(engine, sess, wanted, x, targets, batch_size, comp, at, init)


def run_relevance(engine, sess, wanted, x, targets, batch_size, comp, at, init, extra_keys=()):
    """Run a relevance session over `x` and sort its outputs into relevance_at's result dictionary."""
    model = engine.model
    arrays = engine.run_session(sess, wanted, x, targets, batch_size=batch_size,
                                where=f"{model.path.name} (LRP {comp.name})")
    score = model.score_tensor
    scores = arrays[score]
    tc = arrays[gp.RESOLVED]
    out = {"relevance": {t: arrays[gp.grad_name(t)] for t in at}, "scores": scores, "targets": tc,
           "target_score": arrays[gp.TARGET_SCORE], "start": initial_total(scores, tc, init),
           "composite": comp.name}
    for k in wanted:
        if k not in (score, gp.RESOLVED, gp.TARGET_SCORE) and k not in {gp.grad_name(t) for t in at}:
            out[k] = arrays[k]
    return out


def initial_total(scores: np.ndarray, targets: np.ndarray, init: str) -> np.ndarray:
    """Sum of the initial relevance per image (what conservation compares against)."""
    n, c = scores.shape
    onehot = np.zeros_like(scores)
    onehot[np.arange(n), targets] = 1
    if init == "logit":
        r = onehot * scores
    elif init == "one":
        r = onehot
    elif init == "contrastive":
        r = onehot * (1 + 1 / c) - 1 / c
    else:
        e = np.exp(scores - scores.max(1, keepdims=True))
        y = e / e.sum(1, keepdims=True)
        r = (y * onehot).sum(1, keepdims=True) * (onehot - y)
    return r.sum(axis=1).astype(np.float64)
