"""The numerical guard: refuse NaN/Inf in any output and name the node where it first appears."""

from __future__ import annotations

import numpy as np
import onnx

from graph_passes._graph import ort_model, tensor_array

from ..errors import NumericalError
from .providers import import_onnxruntime, session_options


def first_nonfinite_node(graph: onnx.ModelProto, feeds: dict[str, np.ndarray], providers) -> str | None:
    """'at node NAME (Op), output T' for the first node (in graph order) whose output holds NaN/Inf."""
    for name, value in feeds.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"in the input {name!r}"
    ort = import_onnxruntime()
    m = onnx.ModelProto()
    m.CopyFrom(graph)
    present = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for out in node.output:
            if out and out not in present:
                m.graph.output.append(onnx.ValueInfoProto(name=out))  # onnxruntime infers the type
                present.add(out)
    opts = session_options()
    try:
        data, _ = ort_model(m, opts)
        sess = ort.InferenceSession(data, opts, providers=providers)
        names = [o.name for o in sess.get_outputs()]
        values = dict(zip(names, sess.run(names, feeds)))
    except Exception:  # the trace is a diagnosis: without it the caller still reports the output
        return None
    weights = {t.name: t for t in graph.graph.initializer}  # m's now point at files onnxruntime maps
    for node in m.graph.node:
        for out in node.output:
            v = values.get(out)
            if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all():
                bad = [i for i in node.input if i in weights
                       and not np.isfinite(tensor_array(weights[i])).all()]
                reads = f", which reads weight {bad[0]!r} holding NaN/Inf" if bad else ""
                return f"at node {node.name or '(unnamed)'!r} ({node.op_type}), output {out!r}{reads}"
    return None


def check_finite(arrays: dict[str, np.ndarray], where: str, locate=None) -> None:
    """Refuse NaN/Inf in any float output; `locate(name, array)` may name the node where it first appears."""
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            found = locate(name, arr) if locate is not None else None
            raise NumericalError(f"{where}: non-finite values (NaN/Inf) in {name!r}"
                                 + (f"; they first appear {found}" if found else ""))
