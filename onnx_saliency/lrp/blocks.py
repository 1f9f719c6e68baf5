"""Per-block conservation of a transformer's relevance, and what its token embeddings absorb.

A ViT's residual stream is a chain of residual Adds (two per block: attention, MLP) after the token embedding:
patch tokens (from the patch-embedding Conv), prefix tokens concatenated before them (class, distillation,
register: constants, so the relevance routed to them leaves the input's share), then a position embedding
added (a constant: the proportional rule gives it its share). The relevance at each of those tensors, summed,
shows where relevance is absorbed, block by block: biases and epsilon in the linear layers, the Softmax z-rule,
the LayerNorm shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graph_passes import lrp as R
from graph_passes._graph import ancestors, initializers, producers, tensor_infos


@dataclass(frozen=True)
class TokenStream:
    patches: str | None        # patch tokens, before the prefix tokens are concatenated
    tokens: str | None         # prefix + patch tokens (the Concat's output)
    embedded: str | None       # after the position embedding's Add
    stream: tuple              # residual Add outputs, in graph order

    def tensors(self) -> list[str]:
        return [t for t in (self.patches, self.tokens, self.embedded) if t] + list(self.stream)


def token_stream(canonical, score: str) -> TokenStream | None:
    """The embedding and residual stream of a transformer (a graph whose scores depend on a Softmax that is not
    the scores' own); None for other graphs."""
    g = canonical.graph
    needed = ancestors(g, [score])
    if not any(n.op_type == "Softmax" and n.output[0] in needed and n.output[0] != score for n in g.node):
        return None
    a = R.analyze(canonical)
    prod, inits, infos = producers(g), initializers(g), tensor_infos(canonical)
    convs = {n.output[0] for n in g.node if n.op_type == "Conv"}
    def rank(t):
        info = infos.get(t)
        return len(info.shape) if info is not None and info.shape is not None else 0

    # residual Adds on token tensors (a DeiT's averaging of its two heads is an Add of two activations too)
    stream = tuple(n.output[0] for n in g.node if n.name in a.residual and n.op_type == "Add"
                   and n.output[0] in needed and rank(n.output[0]) >= 3)
    patches = tokens = embedded = None
    for n in g.node:
        out = n.output[0]
        if out not in needed:
            continue
        shape = (infos.get(out).shape if infos.get(out) is not None else None) or ()
        if tokens is None and n.op_type == "Concat" and len(shape) == 3:
            from_conv = [i for i in n.input if ancestors(g, [i]) & convs and not _constant_tokens(i, prod, inits)]
            if len(from_conv) == 1 and len(n.input) > 1:
                patches, tokens = from_conv[0], out
        elif embedded is None and n.op_type == "Add" and len(shape) == 3 and len(n.input) == 2:
            live = [i for i in n.input if i in a.activations]
            const = [i for i in n.input if i in inits]
            if len(live) == 1 and len(const) == 1 and tuple(inits[const[0]].dims[-2:]) == tuple(shape[-2:]):
                embedded = out
                if tokens is None:
                    patches = live[0]
        if stream and out == stream[0]:
            break
    if not stream:
        return None
    if not (patches or tokens or embedded):  # no token embedding found (Swin): the first block's skip input
        first = prod[stream[0]]
        skip = [i for i in first.input if i in ancestors(g, [j for j in first.input if j != i])]
        embedded = skip[0] if len(skip) == 1 else None
    return TokenStream(patches, tokens, embedded, stream)


def _constant_tokens(t: str, prod: dict, inits) -> bool:
    """A learnt token broadcast to the batch: an initializer, or an Expand / Tile of one (a ViT's class token)."""
    node = prod.get(t)
    return t in inits or (node is not None and node.op_type in ("Expand", "Tile", "Identity")
                          and node.input[0] in inits)


def conservation(ts: TokenStream, rel: dict, start: np.ndarray) -> dict:
    """Per image (float64 arrays): "blocks" (blocks, N) R(block input) / R(block output); "stream" R(last block's
    output) / start; "position" and "prefix": the shares of the start relevance that the position embedding and
    the prefix tokens absorb (None where the model has none). `rel` maps the stream's tensors to relevance."""
    def total(t):
        return rel[t].reshape(len(rel[t]), -1).sum(1).astype(np.float64)

    def ratio(a, b):
        return a / np.where(b == 0, 1, b)

    s = np.where(start == 0, 1, start).astype(np.float64)
    stream = list(ts.stream)
    per = 2 if len(stream) % 2 == 0 else 1  # attention + MLP residuals per block
    prev, blocks = ts.embedded or ts.tokens or ts.patches, []
    for k in range(0, len(stream), per):
        out = stream[k + per - 1]
        if prev is not None:
            blocks.append(ratio(total(prev), total(out)))
        prev = out
    below = ts.tokens or ts.patches
    return {"blocks": np.array(blocks), "stream": total(stream[-1]) / s,
            "position": (total(ts.embedded) - total(below)) / s if ts.embedded and below else None,
            "prefix": (total(ts.tokens) - total(ts.patches)) / s if ts.tokens and ts.patches else None}


def conservation_lines(ts: TokenStream, rel: dict, start: np.ndarray) -> list[str]:
    """conservation() as report lines, values for all images comma-separated."""
    c = conservation(ts, rel, start)

    def fmt(v):
        return ", ".join(f"{x:.4g}" for x in v)

    lines = [f"block {k}: R(in) / R(out) = {fmt(v)}" for k, v in enumerate(c["blocks"])]
    lines.append(f"after the last block: R(stream) / start = {fmt(c['stream'])}")
    if c["position"] is not None:
        lines.append(f"position embedding absorbs {fmt(c['position'])} of the start relevance")
    if c["prefix"] is not None:
        lines.append(f"prefix tokens (class/distillation) absorb {fmt(c['prefix'])} of the start relevance")
    return lines
