"""What a run reads is never written over: readers register their files here, writers ask before replacing.

Files are remembered by identity (device, inode), so a symlink, a hard link or another spelling of the same
path is caught too (`export-explainer m.onnx -o ./m.onnx`, `--out` over an image folder's file). A process
reads few files (a model, its external data, side files, images), so the set stays small."""

from __future__ import annotations

import os
import stat

_READ: dict[tuple[int, int], str] = {}


def file_identity(path) -> list[int]:
    """Device, inode, size, modification and change times (ns) of `path`: equal means the same unchanged file
    (any write moves the change time, which no user call can set back)."""
    st = os.stat(os.fspath(path))
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def note_input(path) -> None:
    """Remember `path` (a file this run reads) as never to be written over."""
    try:
        st = os.stat(os.fspath(path))
    except (OSError, ValueError):
        return
    if stat.S_ISREG(st.st_mode):
        _READ.setdefault((st.st_dev, st.st_ino), os.fspath(path))


def refusal(path) -> str | None:
    """Why `path` must not be replaced by a writer, or None: it is an input of this run, or it exists and is
    not a regular file (a folder, a FIFO, a device such as /dev/null, a socket: replacing it would turn it into
    a regular file, or block)."""
    try:
        st = os.stat(os.fspath(path))  # follows a symlink: what the name leads to is what matters
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # the write itself reports what is wrong
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        return f"exists and is {kind}; refusing to replace it"
    source = _READ.get((st.st_dev, st.st_ino))
    if source is not None:
        same = "" if os.path.abspath(source) == os.path.abspath(os.fspath(path)) else f" ({source})"
        return f"is an input of this run{same}; refusing to write over it"
    return None
