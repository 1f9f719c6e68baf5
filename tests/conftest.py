"""Shared fixtures: where ../shared is, and skipping with a clear reason when it is absent."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared():
    if not (SHARED / "models").is_dir():
        pytest.skip(f"needs the shared models folder {SHARED} (real ONNX models and photos); not present here")
    return SHARED
