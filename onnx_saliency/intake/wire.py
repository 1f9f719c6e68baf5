"""Read an ONNX file's structure without its weights: the protobuf wire format, walked just deep enough.

``onnx.load`` parses every weight into protobuf's memory (a 550 MB VGG-16 is 550 MB of heap before anything
else happens), and every copy after that costs as much again. Instead the file is memory-mapped and re-emitted
without the ``raw_data`` of its large top-level initializers, whose byte ranges in the file are returned: the
weight store reads them from the file through a read-only memory map, and onnxruntime reads them from the same
file as external data (mapped, not copied). Only ModelProto.graph (field 7), GraphProto.initializer (field 5)
and TensorProto.{dims (1), data_type (2), raw_data (9)} are interpreted; every other byte is copied verbatim.
Anything unexpected makes the caller fall back to ``onnx.load``.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import onnx

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_RAW = 1, 2, 9


class WireError(ValueError):
    """The bytes are not what this walker expects (the caller parses the file the ordinary way)."""


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of the field's tag, end of its tag, start of its payload, end of the
    field); for length-delimited fields the length varint lies between the tag's end and the payload."""
    pos = start
    while pos < end:
        tag_at = pos
        tag, pos = _varint(buf, pos)
        tag_end = pos
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, after = _varint(buf, pos)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:
            raise WireError(f"wire type {wire}")
        if after > end:
            raise WireError("field runs past its message")
        yield number, wire, tag_at, tag_end, pos, after
        pos = after


def _tensor(buf, start: int, end: int, min_elements: int):
    """(TensorProto bytes without raw_data, (offset, length) of raw_data) or None when it is kept whole."""
    dims, dtype, raw = [], None, None
    for number, wire, _, _, pos, after in _fields(buf, start, end):
        if number == _TENSOR_DIMS:
            if wire == 0:
                dims.append(_varint(buf, pos)[0])
            elif wire == 2:  # packed
                p = pos
                while p < after:
                    v, p = _varint(buf, p)
                    dims.append(v)
        elif number == _TENSOR_TYPE and wire == 0:
            dtype = _varint(buf, pos)[0]
        elif number == _TENSOR_RAW and wire == 2:
            raw = (pos, after - pos)
    if raw is None or dtype is None:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if count < min_elements or count * itemsize != raw[1] or dtype in (onnx.TensorProto.STRING,):
        return None  # small, or data that does not fill its shape: parsed and checked as usual
    kept = b"".join(bytes(buf[tag_at:after]) for number, _, tag_at, _, _, after in _fields(buf, start, end)
                    if number != _TENSOR_RAW)
    return kept, raw


def read_structure(path, min_elements: int) -> tuple[onnx.ModelProto, dict[int, tuple[int, int]]]:
    """The model in `path` with the raw data of its large top-level initializers left out, and where that data
    is: {initializer index: (byte offset in the file, length)}. Raises WireError for what it cannot walk."""
    with open(Path(path), "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                parts, found = [], {}
                for number, wire, tag_at, tag_end, pos, after in _fields(buf, 0, len(buf)):
                    if number != _MODEL_GRAPH or wire != 2:
                        parts.append(bytes(buf[tag_at:after]))
                        continue
                    graph, index = [], 0
                    for g_number, g_wire, g_tag, g_tag_end, g_pos, g_after in _fields(buf, pos, after):
                        if g_number != _GRAPH_INITIALIZER or g_wire != 2:
                            graph.append(bytes(buf[g_tag:g_after]))
                            continue
                        stripped = _tensor(buf, g_pos, g_after, min_elements)
                        if stripped is None:
                            graph.append(bytes(buf[g_tag:g_after]))
                        else:
                            kept, raw = stripped
                            graph.append(bytes(buf[g_tag:g_tag_end]) + _encode_varint(len(kept)) + kept)
                            found[index] = raw
                        index += 1
                    body = b"".join(graph)
                    parts.append(bytes(buf[tag_at:tag_end]) + _encode_varint(len(body)) + body)
                data = b"".join(parts)
            finally:
                buf.release()
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return model, found
