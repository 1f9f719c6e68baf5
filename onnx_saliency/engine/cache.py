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

Beside each rewritten graph the cache keeps onnxruntime's optimisation of it (``.optimized`` entries, checked
the same way, each with a ``.weights`` file trusted by its file identity: see engine.optimized and
load_optimized), and, in ``digests/``, the sha256 of model files by their identity (FileDigests).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from ..guard import file_identity

FORMAT = b"onnx-saliency-graph-cache/1"
SUFFIX = ".graph"
OPTIMIZED_SUFFIX = ".optimized"  # onnxruntime's optimised graphs (engine.optimized)
WEIGHTS_SUFFIX = ".weights"  # their weight files
SAVING_PREFIX = ".optimizing-"  # their temporary folders while onnxruntime writes them
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
        self.optimized_hits = 0  # of the hits, onnxruntime's optimised graphs (engine.optimized)

    def _entry(self, key, suffix: str = SUFFIX) -> tuple[Path, bytes] | None:
        text = key_text(self.model_sha256, key)
        if text is None:
            return None
        name = hashlib.sha256(text.encode()).hexdigest()
        return self.folder / f"{name}{suffix}", text.encode()

    def load(self, key, suffix: str = SUFFIX, count: bool = True) -> bytes | None:
        entry = self._entry(key, suffix)
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
        self.hits += count
        try:
            os.utime(path)  # most recently used: evicted last
        except OSError:
            pass
        return data

    def save(self, key, data: bytes, suffix: str = SUFFIX, keep=None) -> None:
        """Write the entry for `key` (atomically), then evict down to the bound, never this entry (nor `keep`,
        a file that belongs with it)."""
        entry = self._entry(key, suffix)
        if entry is None:
            return
        path, text = entry
        header = b"%s\n%s\n%s\n" % (FORMAT, text.replace(b"\n", b" "), hashlib.sha256(data).hexdigest().encode())
        if _write_atomically(path, header, data):  # else: a cache that cannot be written is only a slower run
                evict(self.folder, self.max_bytes, keep={path, keep})

    # --- onnxruntime's optimised graphs (engine.optimized) -------------------------------------------------
    def load_optimized(self, key, count: bool = True) -> tuple[bytes, Path] | None:
        """(optimised graph, its weight file) saved for `key`, or None. The entry is checked by hash like every
        entry; its weight file (written once under a name of its own, never rewritten) by its identity: any write
        to it, even of the same bytes, changes its change time, and the entry is deleted and rebuilt (never
        trusted; hashing it on every run would cost as much as what the entry saves)."""
        import json

        data = self.load(key, OPTIMIZED_SUFFIX, count)
        if data is None:
            return None
        head, _, graph = data.partition(b"\n")
        try:
            meta = json.loads(head)
            weights = self.folder / meta["weights"]
            same = file_identity(weights) == meta["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if not same:
            self.rebuilt += 1
            self.hits -= count
            entry = self._entry(key, OPTIMIZED_SUFFIX)
            if entry is not None:
                named = _referenced_weights(entry[0])
                _unlink(entry[0])
                if named is not None:
                    _unlink(self.folder / named)
            return None
        self.optimized_hits += count  # (the entry's own time was touched by load: eviction keeps the pair by it)
        return graph, weights

    def save_optimized(self, key, graph: bytes, weights: Path) -> None:
        """Keep `graph` and its weight file (moved into the folder under a name of its own: a process that
        mapped an older one keeps reading that) for `key`."""
        import json

        entry = self._entry(key, OPTIMIZED_SUFFIX)
        if entry is None:
            return
        stem = entry[0].name[:-len(OPTIMIZED_SUFFIX)]
        final = self.folder / f"{stem}.{uuid.uuid4().hex[:8]}{WEIGHTS_SUFFIX}"
        replaced = _referenced_weights(entry[0])
        try:
            os.replace(weights, final)
            meta = {"weights": final.name, "identity": file_identity(final)}
        except OSError:
            _unlink(final)
            return
        self.save(key, json.dumps(meta).encode() + b"\n" + graph, OPTIMIZED_SUFFIX, keep=final)
        if replaced is not None and replaced != final.name:  # the entry this one replaced: its weights go too
            _unlink(self.folder / replaced)


def _write_atomically(path: Path, *parts: bytes) -> bool:
    """Write `parts` to a per-process temporary name beside `path` and move it into place (atomic: two processes
    writing the same file leave one complete file); False, and nothing left behind, when it cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
        return True
    except OSError:
        _unlink(tmp)
        return False


def _referenced_weights(entry: Path) -> str | None:
    """The weight file an optimised-graph entry names (None when there is none or it is unreadable); a
    concurrent save may leave the other's file unreferenced, which eviction removes in time."""
    import json

    try:
        with open(entry, "rb") as f:
            parts = [f.readline() for _ in range(4)]
        name = json.loads(parts[3])["weights"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return name if isinstance(name, str) and "/" not in name and name.endswith(WEIGHTS_SUFFIX) else None


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
        if path.suffix in (SUFFIX, OPTIMIZED_SUFFIX, WEIGHTS_SUFFIX) and not path.name.startswith("."):
            try:
                out.append((path, path.stat()))
            except OSError:  # deleted by another process meanwhile
                pass
    return out


def evict(folder, max_bytes: int, keep=()) -> int:
    """Delete least recently used entries until the folder holds at most `max_bytes` (never the files in
    `keep`); returns how many."""
    found = entries(folder)
    used = {p.name[:-len(OPTIMIZED_SUFFIX)]: st.st_mtime_ns for p, st in found if p.suffix == OPTIMIZED_SUFFIX}
    # a weight file is as recently used as its optimised graph's entry (loads touch only the entry)
    found.sort(key=lambda e: used.get(e[0].name.split(".")[0], e[1].st_mtime_ns) if e[0].suffix == WEIGHTS_SUFFIX
               else e[1].st_mtime_ns)
    total = sum(st.st_size for _, st in found)
    removed = 0
    for path, st in found:
        if total <= max_bytes:
            break
        if path in keep:
            continue
        _unlink(path)
        total -= st.st_size
        removed += 1
    return removed


# --- model file digests, remembered by file identity ---------------------------------------------------------
# Hashing a model costs a read of every byte (0.08 s per 100 MB here) on every run. A file whose device, inode,
# size, modification and change times (nanoseconds) are those recorded after hashing it holds the same bytes:
# any write moves its change time, which no user call can set back (git's index and ccache trust the same).
# Then the recorded sha256, and the NaN check done with it, are reused without reading the file. A file
# changed less than RACY_SECONDS before it was hashed is not remembered: on file systems with coarse
# timestamps a second write within that time could leave every field equal (git's "racily clean" entries).
DIGESTS = "digests"
RACY_SECONDS = 2.0


class FileDigests:
    """get(path) -> the sha256 recorded for this very file, or None; put(path, identity, sha256) records it."""

    def __init__(self, folder):
        self.folder = Path(folder) / DIGESTS

    def _entry(self, path) -> Path:
        return self.folder / (hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32] + ".json")

    def get(self, path) -> str | None:
        import json

        try:
            record = json.loads(self._entry(path).read_text())
            same = record["path"] == str(Path(path).resolve()) and record["identity"] == file_identity(path)
            digest = record["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return digest if same and isinstance(digest, str) and len(digest) == 64 else None

    def put(self, path, identity: list[int], digest: str) -> None:
        """Record `digest` for the file as it was when `identity` was taken (before reading it)."""
        import json
        import time

        if time.time_ns() - max(identity[3], identity[4]) < RACY_SECONDS * 1e9:
            return
        record = {"path": str(Path(path).resolve()), "identity": identity, "sha256": digest}
        _write_atomically(self._entry(path), json.dumps(record).encode())  # or not remembered: hashed next run


def info(folder) -> dict:
    """Rewritten graphs, onnxruntime's optimised graphs, their weight files, and the bytes of all."""
    found = entries(folder)
    return {"folder": str(folder), "entries": sum(1 for p, _ in found if p.suffix == SUFFIX),
            "optimized": sum(1 for p, _ in found if p.suffix == OPTIMIZED_SUFFIX),
            "weight_files": sum(1 for p, _ in found if p.suffix == WEIGHTS_SUFFIX),
            "bytes": sum(st.st_size for _, st in found)}


def clear(folder) -> int:
    """Delete every entry, weight file and remembered digest (and stale temporary files); returns the number of
    graphs (rewritten and optimised) deleted."""
    folder = Path(folder)
    n = 0
    for path, _ in entries(folder):
        _unlink(path)
        n += path.suffix in (SUFFIX, OPTIMIZED_SUFFIX)
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):  # what _write_atomically of a killed process left
            _unlink(path)
        for path in folder.glob(f"{SAVING_PREFIX}*"):  # saves of optimised graphs a killed process left
            shutil.rmtree(path, ignore_errors=True)
    if (folder / DIGESTS).is_dir():
        for path in (folder / DIGESTS).iterdir():
            _unlink(path)
    return n
