"""Atomic output writers: a crash or Ctrl-C never leaves a half-written file under the final name.

Each writer serialises in memory, writes a hidden temp file in the target's folder (same file system, so
``os.replace`` is an atomic rename), fsyncs it and renames it over the target. On failure the temp file is
removed; ``OSError`` becomes a one-line :class:`SaliencyError` naming the path, anything else propagates.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ..errors import SaliencyError
from ..guard import refusal

__all__ = ["ensure_dir", "write_bytes", "write_png", "write_npy", "write_json", "json_default"]

# mkstemp creates 0600 files; outputs should get the permissions a plain open() would give. Reading the
# umask means setting it, so do it once at import rather than racing other threads on every write.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def ensure_dir(path) -> Path:
    """Create a folder (and parents) if needed; return it as a Path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaliencyError(f"{path}: cannot create folder ({err.strerror or err})") from None
    return path


def temp_prefix(path: Path, pid: int | None = None) -> str:
    """'.<name>.<pid>.': temp files carry their writer's process id, so a run cleaning up after a killed one
    (`stale_temps`) never deletes the live temp file of another run writing into the same folder."""
    return f".{Path(path).name}.{os.getpid() if pid is None else pid}."


def stale_temps(path: Path) -> list[Path]:
    """Temp files of `path` left by writers that are no longer running (killed between write and rename)."""
    path = Path(path)
    found = []
    try:
        entries = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return []
    head = f".{path.name}"
    for entry in entries:
        name = entry.name
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        rest = name[len(head):-len(".tmp")]  # '.PID.random' now; 'random' (no pid) from older versions
        pid = rest[1:].split(".", 1)[0] if rest.startswith(".") else ""
        if not pid.isdecimal() or not _alive(int(pid)):
            found.append(entry)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # someone else's live process (or unknowable): leave its file alone
    return True


def write_bytes(path, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``; refused when ``path`` is an input of this run or exists
    and is not a regular file (``guard.refusal``)."""
    path = Path(path)
    why = refusal(path)
    if why:
        raise SaliencyError(f"{path}: {why}")
    folder = ensure_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise SaliencyError(f"{path}: cannot write ({err.strerror or err})") from err
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def write_png(path, rgb_uint8: np.ndarray) -> Path:
    """Write an (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey uint8 image as PNG."""
    img = np.asarray(rgb_uint8)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise SaliencyError(f"{path}: PNG needs uint8 HxW, HxWx3 or HxWx4, got {img.dtype} {img.shape}")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR if img.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise SaliencyError(f"{path}: PNG encoding failed")
    return write_bytes(path, buf.tobytes())


def write_npy(path, array) -> Path:
    """Write an array in .npy format (no pickles, exact name: np.save would append .npy)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return write_bytes(path, buf.getvalue())


def json_default(obj):
    """``json.dumps`` hook for numpy scalars/arrays and paths."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):  # np.float32, np.int64, np.bool_, ...
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON (key order kept) with a trailing newline."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=json_default, ensure_ascii=False)
    # a file name with bytes that are not UTF-8 reaches us as surrogates: written as \udcXX escapes, which
    # json.loads turns back into the same str (os.fsencode gives the original bytes)
    return write_bytes(path, (text + "\n").encode("utf-8", "backslashreplace"))
