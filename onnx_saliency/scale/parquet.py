"""The Parquet output of a scale-out run: one row per (image, method), written in shards.

Layout of ``OUT``::

    _explain.json           what the folder holds (model, methods, layers, options): --resume checks it
    maps/part-<digest>.parquet   committed shards (readers: ``pyarrow.parquet.read_table(OUT / "maps")``)
    errors.parquet          the images that failed, one row each, with the reason (rewritten at the end)

A shard is committed by one atomic rename of a complete file, so a reader or a resumed run sees whole shards
or none; temporary files start with ``.`` and are ignored by pyarrow. The images of a shard that failed are
recorded in the shard's own footer (key ``onnx_saliency.errors``), so results and failures commit together;
``errors.parquet`` is gathered from the footers. A resumed run skips every image with a row for each of its
methods and retries the failed ones (a failure superseded by a later success is dropped from
``errors.parquet``).

Columns: id, path, method, layer, target, label, score, height, width, map (float16, row-major, H*W values),
map_min, map_max (of the float32 map), signed, constant, and provenance: model, model_sha256,
execution_provider, preprocessing, options, notes, versions (JSON strings).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import SaliencyError
from ..output.sidecar import sidecar
from ..output.writers import ensure_dir, json_default, write_bytes

MAPS = "maps"
ERRORS = "errors.parquet"
MANIFEST = "_explain.json"
FOOTER_ERRORS = b"onnx_saliency.errors"


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise SaliencyError("--format parquet needs pyarrow: pip install 'onnx-saliency[ray]'") from err
    return pa, pq


def schema():
    pa, _ = _pa()
    return pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("method", pa.string()), ("layer", pa.string()),
        ("target", pa.int64()), ("label", pa.string()), ("score", pa.float32()),
        ("height", pa.int32()), ("width", pa.int32()), ("map", pa.list_(pa.float16())),
        ("map_min", pa.float32()), ("map_max", pa.float32()), ("signed", pa.bool_()), ("constant", pa.bool_()),
        ("model", pa.string()), ("model_sha256", pa.string()), ("execution_provider", pa.string()),
        ("preprocessing", pa.string()), ("options", pa.string()), ("notes", pa.string()), ("versions", pa.string()),
    ])


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=json_default, ensure_ascii=False)


class ShardRows:
    """Collects one shard's rows; its :meth:`write` has the signature of ``write_image_outputs``."""

    def __init__(self, ids: dict, present: dict | None = None):
        self.ids = ids                  # image (as explain_images names it) -> (id, path)
        self.present = present or {}    # id -> methods already committed by an earlier run
        self.rows: list[dict] = []

    def write(self, explainer, result, k: int, image, out, options) -> None:
        image_id, path = self.ids[image]
        if result.method in self.present.get(image_id, ()):
            return
        meta = sidecar(explainer, result, k, Path(path), options)
        saliency = np.asarray(result.maps[k], np.float32)
        self.rows.append({
            "id": image_id, "path": path, "method": result.method, "layer": ",".join(result.layers),
            "target": meta["target"]["class"], "label": meta["target"]["label"],
            "score": np.float32(result.scores[k]), "height": saliency.shape[0], "width": saliency.shape[1],
            "map": saliency.astype(np.float16).ravel(), "map_min": saliency.min(), "map_max": saliency.max(),
            "signed": meta["map"]["signed"], "constant": meta["map"]["constant"],
            "model": meta["model"], "model_sha256": meta["model_sha256"],
            "execution_provider": meta["execution_provider"], "preprocessing": _json(meta["preprocessing"]),
            "options": _json(meta["options"]), "notes": _json(meta["notes"]), "versions": _json(meta["versions"]),
        })

    def table(self):
        pa, _ = _pa()
        sch = schema()
        columns = {}
        for f in sch:
            values = [r[f.name] for r in self.rows]
            if f.name == "map":
                offsets = np.cumsum([0] + [len(v) for v in values], dtype=np.int32)
                flat = np.concatenate(values) if values else np.zeros(0, np.float16)
                columns[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float16()))
            else:
                columns[f.name] = pa.array(values, f.type)
        return pa.Table.from_pydict(columns, schema=sch)


def shard_name(ids) -> str:
    """Named by its images: a shard redone with the same images replaces itself, never duplicates."""
    return "part-" + hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:20] + ".parquet"


def commit_shard(out: Path, ids, rows: ShardRows, failures: list[dict]) -> Path:
    """Write the shard's rows with its failures in the footer to a hidden file, fsync, rename: committed."""
    _, pq = _pa()
    folder = ensure_dir(Path(out) / MAPS)
    table = rows.table()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           FOOTER_ERRORS: _json(failures).encode("utf-8")})
    final = folder / shard_name(ids)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + final.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        tmp = None
    except OSError as err:
        raise SaliencyError(f"{final}: cannot write ({err.strerror or err})") from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return final


def committed(out: Path) -> tuple[dict, dict]:
    """(id -> set of methods with a row, id -> latest recorded failure) over the committed shards; reads only
    the id and method columns and the footers. Temporary files of killed runs are removed."""
    _, pq = _pa()
    folder = Path(out) / MAPS
    present: dict[str, set] = {}
    failures: dict[str, dict] = {}
    if not folder.is_dir():
        return present, failures
    for stale in folder.glob(".part-*.tmp"):
        stale.unlink(missing_ok=True)
    for shard in sorted(folder.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime_ns):
        try:
            f = pq.ParquetFile(shard)
            table = f.read(columns=["id", "method"])
            recorded = json.loads((f.schema_arrow.metadata or {}).get(FOOTER_ERRORS, b"[]"))
        except Exception as err:  # pyarrow raises its own error types for damaged files
            raise SaliencyError(f"{shard}: not a readable shard ({str(err).splitlines()[0]}); "
                                "remove it and run again with --resume") from None
        for image_id, method in zip(table.column("id").to_pylist(), table.column("method").to_pylist()):
            present.setdefault(image_id, set()).add(method)
        for failure in recorded:
            failures[failure["id"]] = failure  # shards in commit order: the latest attempt wins
    return present, failures


def write_errors(out: Path, failures: dict, present: dict, methods) -> list[dict]:
    """errors.parquet: the failures not superseded by a complete later result. Returns its rows."""
    pa, pq = _pa()
    rows = [f for image_id, f in sorted(failures.items())
            if not set(methods) <= present.get(image_id, set())]
    table = pa.Table.from_pydict({k: pa.array([r.get(k) for r in rows], pa.string())
                                  for k in ("id", "path", "error")})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(Path(out) / ERRORS, sink.getvalue().to_pybytes())
    return rows


def check_manifest(out: Path, manifest: dict, resume: bool) -> None:
    """A folder holds one run's dataset: refuse to mix models, methods, layers or options, and refuse to add
    shards to an existing dataset without --resume (that would duplicate rows). Writes nothing."""
    path = Path(out) / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not resume:
            raise SaliencyError(f"--out {out}: already holds a Parquet dataset; pass --resume to complete it, or "
                                "choose an empty folder")
        if old != json.loads(_json(manifest)):
            diff = sorted(k for k in manifest if not isinstance(old, dict) or old.get(k) != json.loads(
                _json(manifest[k])))
            raise SaliencyError(f"--resume: {out} was written with a different {', '.join(diff) or 'layout'}; "
                                "choose a new --out")
    elif (Path(out) / MAPS).is_dir() and any((Path(out) / MAPS).glob("part-*.parquet")):
        raise SaliencyError(f"--out {out}: holds shards but no {MANIFEST}; choose an empty folder")


def write_manifest(out: Path, manifest: dict) -> None:
    """Written once the model and options have proven to run, so a refused run leaves nothing behind."""
    write_bytes(Path(out) / MANIFEST, (json.dumps(json.loads(_json(manifest)), indent=2) + "\n").encode("utf-8"))


def read_maps(out, method: str | None = None) -> dict:
    """(id, method) -> float16 (H, W) map from a Parquet output folder (reading back, tests, audits)."""
    _, pq = _pa()
    table = pq.read_table(Path(out) / MAPS, columns=["id", "method", "height", "width", "map"])
    keys = zip(*(table.column(c).to_pylist() for c in ("id", "method", "height", "width")))
    maps = {}
    for (image_id, m, h, w), values in zip(keys, _lists(table.column("map"))):
        if method is None or m == method:
            maps[(image_id, m)] = values.reshape(h, w)
    return maps


def _lists(column):
    """The float16 arrays of a list<halffloat> column, chunk by chunk, without a Python float per value."""
    for chunk in column.chunks:
        flat = chunk.values.to_numpy(zero_copy_only=False)
        offsets = chunk.offsets.to_numpy()
        for a, b in zip(offsets[:-1], offsets[1:]):
            yield flat[a:b]
