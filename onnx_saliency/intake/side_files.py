"""Side files the user names (--labels, --rule-map, --annotations), read without trusting them: a regular file
(a FIFO would block forever, a device never end), of a sane size, UTF-8 text, JSON of a sane depth. Every
refusal is one line naming the option and the file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import SaliencyError
from ..guard import note_input

MAX_SIDE_FILE = 64 << 20  # bytes: far above any label list, rule map or annotation file


def read_text(path, option: str) -> str:
    path = Path(path)
    where = f"{option} {path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SaliencyError(f"{where}: no such file") from None
    except OSError as err:
        raise SaliencyError(f"{where}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "not a regular file"
        raise SaliencyError(f"{where}: is {kind}; expected a file")
    if st.st_size > MAX_SIDE_FILE:
        raise SaliencyError(f"{where}: {st.st_size} bytes; side files over {MAX_SIDE_FILE >> 20} MiB are refused")
    note_input(path)  # never written over by this run's outputs
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIDE_FILE + 1)
    except OSError as err:
        raise SaliencyError(f"{where}: cannot read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise SaliencyError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as "
                            "UTF-8") from None


def parse_json(text: str, path, option: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SaliencyError(f"{option} {path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise SaliencyError(f"{option} {path}: JSON nested too deeply") from None


def read_json(path, option: str):
    return parse_json(read_text(path, option), path, option)
