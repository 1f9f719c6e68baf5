"""Which files under a folder get opened while a block runs: Linux inotify, so opens from C/C++ (onnx,
onnxruntime, OpenCV) count as well as Python's. Used to prove a refused model reads nothing outside its folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

IN_ACCESS, IN_OPEN, IN_NONBLOCK = 0x1, 0x20, 0o4000


def _libc():
    if not sys.platform.startswith("linux"):
        pytest.skip("inotify needs Linux")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return libc


@contextmanager
def opened_files(folder: Path):
    """Yields a list that, after the block, holds the names of files in `folder` opened or read during it."""
    libc = _libc()
    fd = libc.inotify_init1(IN_NONBLOCK)
    if fd < 0:
        pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")
    seen: list[str] = []
    try:
        if libc.inotify_add_watch(fd, os.fsencode(folder), IN_OPEN | IN_ACCESS) < 0:
            pytest.skip(f"inotify_add_watch failed: {os.strerror(ctypes.get_errno())}")
        yield seen
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            data = b""
        i = 0
        while i + 16 <= len(data):
            _, _, _, length = struct.unpack_from("iIII", data, i)
            name = data[i + 16:i + 16 + length].rstrip(b"\0").decode()
            seen.append(name or ".")  # "." : the folder itself was opened (listed)
            i += 16 + length
    finally:
        os.close(fd)
