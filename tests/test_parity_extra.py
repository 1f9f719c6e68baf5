"""The [parity] extra's torchvision imports where users meet it: through onnx_saliency.parity, as the README says."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ("pytorch_grad_cam", "zennit.torchvision", "torchcam.methods")  # each imports torchvision


@pytest.mark.parity
def test_torchvision_and_the_reference_libraries_import_after_the_packaged_shim():
    """In a fresh interpreter, as a user's script: without the shim the CUDA-built torchvision wheel dies on
    `operator torchvision::nms does not exist` next to the CPU torch."""
    pytest.importorskip("torch")
    missing = [m for m in ("torchvision", *REFERENCES) if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    code = ("from onnx_saliency.parity import import_torchvision, install_torchvision_cpu_shim\n"
            "tv = import_torchvision()\n"
            + "".join(f"import {m}\n" for m in REFERENCES)
            + "install_torchvision_cpu_shim()  # a second call changes nothing\n"
            "print(type(tv.models.resnet18()).__name__, tv is import_torchvision())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ResNet", "True"]


def test_the_readme_shows_the_shim_where_it_explains_the_parity_extra():
    text = (ROOT / "README.md").read_text()
    parity = text[text.index("The `parity` extra"):]
    parity = parity[:parity.index("\n\n")]
    assert "onnx_saliency.parity" in parity and "install_torchvision_cpu_shim" in parity
