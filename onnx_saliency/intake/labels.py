"""Class names from the user: a list, a JSON list, a Keras-style class-index JSON, or a text file."""

from __future__ import annotations

from pathlib import Path

from ..errors import SaliencyError
from .side_files import parse_json, read_text


def load_labels(source) -> list[str]:
    """Labels from a list, a JSON list, a Keras-style class-index JSON, or a text file (one per line)."""
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    path = Path(source)
    text = read_text(path, "--labels")
    if path.suffix.lower() == ".json":
        data = parse_json(text, path, "--labels")
        if isinstance(data, list):
            return [str(s) for s in data]
        if isinstance(data, dict):
            try:
                return [str(v[-1] if isinstance(v, list) else v) for _, v in sorted(data.items(), key=lambda kv: int(kv[0]))]
            except ValueError as err:
                raise SaliencyError(f"--labels {path}: keys must be class indices") from err
        raise SaliencyError(f"--labels {path}: expected a list or an index -> name mapping")
    return [line.strip() for line in text.splitlines() if line.strip()]
