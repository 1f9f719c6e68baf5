"""Shared fixtures: where ../shared is, and skipping with a clear reason when it is absent."""

import os
from pathlib import Path

import pytest

# The suite never reads or writes the user's cache of rewritten graphs: off unless a test turns it on, with a
# folder of its own (tests/test_coldstart.py).
os.environ["ONNX_SALIENCY_CACHE"] = "off"

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared():
    if not (SHARED / "models").is_dir():
        pytest.skip(f"needs the shared models folder {SHARED} (real ONNX models and photos); not present here")
    return SHARED
