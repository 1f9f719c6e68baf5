"""A model file's sha256, begun before the heavy imports.

The cache is keyed by the model's sha256 (engine.cache); the file is read once for it and for the NaN check of
its weights (intake.model._FileScan), beside parsing on a second thread. Started only when the model is read,
that scan ended after canonicalising on ResNet-50 (97 MB: 0.08 s of hashing) and a cold run waited for it. The
command line knows the file before it imports onnx, onnxruntime and OpenCV (0.1 s on ResNet-50), so it starts
hashing here, with nothing but the standard library loaded; the scan then only checks the weights for NaN and
takes this digest, if the file is still the one that was hashed (same identity, see guard.file_identity).
"""

from __future__ import annotations

import hashlib
import os
import threading

from .guard import file_identity

_BLOCK = 16 << 20
_STARTED: dict[str, "_Hashing"] = {}


class _Hashing:
    def __init__(self, path: str):
        self.path = path
        self.identity = file_identity(path)  # before reading: a write meanwhile changes it
        self.hexdigest: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            digest = hashlib.sha256()
            buffer = memoryview(bytearray(_BLOCK))  # read into again and again (no fresh pages per block)
            with open(self.path, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    digest.update(buffer[:n])
            self.hexdigest = digest.hexdigest()
        except OSError:  # the scan reads the file again and reports what is wrong with it
            pass


def start(path, cache_folder=None) -> None:
    """Hash the regular file `path` on a second thread, unless `cache_folder` remembers its digest (then a run
    does not read it at all)."""
    path = os.fspath(path)
    try:
        if path in _STARTED or not os.path.isfile(path):
            return
        if cache_folder is not None:
            from .engine.cache import FileDigests

            if FileDigests(cache_folder).get(path) is not None:
                return
        _STARTED[path] = _Hashing(path)
    except OSError:
        return


def take(path, identity) -> tuple[str, list[int]] | None:
    """(sha256, the identity the file had when hashing began) of the hashing started for `path`, waited for,
    if the file had `identity` then; None when none was started or the file is another one now."""
    found = _STARTED.pop(os.fspath(path), None)
    if found is None:
        return None
    found.thread.join()
    if found.hexdigest is None or identity is None or found.identity != identity:
        return None
    return found.hexdigest, found.identity


def forget() -> None:
    """Drop every hashing started and not taken (a command that ended before reading its model: the file may
    change before the next command of the same process; a thread still running finishes on its own)."""
    _STARTED.clear()
