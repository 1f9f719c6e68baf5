"""A persistent cache of rewritten graphs: an ``Engine.graph_source`` that keeps what the engine builds on disk.

One file per graph, named by the sha256 of (model sha256, graph key, code fingerprint): the model file's hash,
the rewrite the engine asked for, and the version of the code that rewrites (package version, onnx version, and
a hash of the rewriting modules' sources, so an edited checkout never serves graphs its old code built). A file
holds a header line (format, the full key text, the payload's sha256) and the serialised graph. The graph's
model weights are placeholders resolved against the loaded model's own weight store (they are never written
twice); weights the rewrite derived are inline.

Safety: an entry is written to a per-process temporary name in the same folder and moved into place with
``os.replace`` (atomic on POSIX and Windows): two processes writing the same entry leave one complete file,
whichever came last. On load the payload's hash and the key text are checked: a corrupt, truncated or foreign
file is deleted and the graph rebuilt, never trusted. The folder is kept under ``max_bytes`` by deleting the
least recently used entries (a hit touches its file's modification time).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

FORMAT = b"onnx-saliency-graph-cache/1"
SUFFIX = ".graph"
DEFAULT_MAX_BYTES = 2 << 30
ENV = "ONNX_SALIENCY_CACHE"
_OFF = {"", "0", "off", "none", "no", "false"}


def default_cache_dir() -> Path | None:
    """$ONNX_SALIENCY_CACHE (a folder, or off/0/none to disable), else the user's cache folder."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "onnx-saliency"


_FINGERPRINT: str | None = None


def code_fingerprint() -> str:
    """Package and onnx versions plus a hash of the sources that rewrite graphs (graph_passes, the engine,
    the methods and LRP modules that build graphs): a graph is only reused by the code that built it."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        import onnx

        import graph_passes

        from .. import __version__

        h = hashlib.sha256(f"{__version__}|{onnx.__version__}".encode())
        here = Path(__file__).resolve().parents[1]
        roots = [Path(graph_passes.__file__).resolve().parent, here / "engine", here / "methods", here / "lrp",
                 here / "intake"]
        for root in roots:
            for path in sorted(root.rglob("*.py")):
                h.update(path.name.encode())
                h.update(path.read_bytes())
        _FINGERPRINT = h.hexdigest()[:16]
    return _FINGERPRINT


def key_text(model_sha256: str, key) -> str | None:
    """The stable text of a graph key; None for a key whose text is not stable across processes."""
    text = f"{model_sha256}|{code_fingerprint()}|{key!r}"
    return None if " at 0x" in text else text  # an object without a value repr: never cached


class GraphCache:
    """load(key) / save(key, bytes) for one model, backed by files in `folder`."""

    def __init__(self, folder, model_sha256: str, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.model_sha256 = model_sha256
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0  # corrupt or foreign entries found and deleted

    def _entry(self, key) -> tuple[Path, bytes] | None:
        text = key_text(self.model_sha256, key)
        if text is None:
            return None
        name = hashlib.sha256(text.encode()).hexdigest()
        return self.folder / f"{name}{SUFFIX}", text.encode()

    def load(self, key) -> bytes | None:
        entry = self._entry(key)
        if entry is None:
            return None
        path, text = entry
        try:
            blob = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        data = _unpack(blob, text)
        if data is None:
            self.rebuilt += 1
            _unlink(path)
            return None
        self.hits += 1
        try:
            os.utime(path)  # most recently used: evicted last
        except OSError:
            pass
        return data

    def save(self, key, data: bytes) -> None:
        entry = self._entry(key)
        if entry is None:
            return
        path, text = entry
        header = b"%s\n%s\n%s\n" % (FORMAT, text.replace(b"\n", b" "), hashlib.sha256(data).hexdigest().encode())
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # a cache that cannot be written is only a slower run
            _unlink(locals().get("tmp"))
            return
        evict(self.folder, self.max_bytes, keep=path)


def _unpack(blob: bytes, text: bytes) -> bytes | None:
    """The payload of a cache file, or None when it is not a complete, uncorrupted entry for `text`."""
    parts = blob.split(b"\n", 3)
    if len(parts) != 4 or parts[0] != FORMAT or parts[1] != text.replace(b"\n", b" "):
        return None
    data = parts[3]
    return data if hashlib.sha256(data).hexdigest().encode() == parts[2] else None


def _unlink(path) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def entries(folder) -> list[tuple[Path, os.stat_result]]:
    folder = Path(folder)
    out = []
    if not folder.is_dir():
        return out
    for path in folder.iterdir():
        if path.suffix == SUFFIX and not path.name.startswith("."):
            try:
                out.append((path, path.stat()))
            except OSError:  # deleted by another process meanwhile
                pass
    return out


def evict(folder, max_bytes: int, keep=None) -> int:
    """Delete least recently used entries until the folder holds at most `max_bytes`; returns how many."""
    found = sorted(entries(folder), key=lambda e: e[1].st_mtime_ns)
    total = sum(st.st_size for _, st in found)
    removed = 0
    for path, st in found:
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        _unlink(path)
        total -= st.st_size
        removed += 1
    return removed


def info(folder) -> dict:
    found = entries(folder)
    return {"folder": str(folder), "entries": len(found), "bytes": sum(st.st_size for _, st in found)}


def clear(folder) -> int:
    """Delete every entry (and stale temporary files); returns the number of entries deleted."""
    folder = Path(folder)
    n = 0
    for path, _ in entries(folder):
        _unlink(path)
        n += 1
    if folder.is_dir():
        for path in folder.glob(f".*{SUFFIX}.*.tmp"):
            _unlink(path)
    return n
