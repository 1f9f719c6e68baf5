"""Long runs show a progress bar on stderr when it is a terminal, and nothing in pipes or under --quiet."""

import os
import pty
import select
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.graphs import tiny_classifier

BARS = {"explain": "explaining", "evaluate": "evaluating", "compare": "comparing", "audit": "auditing"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    model = tiny_classifier(root / "tiny.onnx")
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    return root, model, folder


def _args(command, root, model, folder):
    return {"explain": ["explain", model, folder, "-m", "gradcam", "-m", "gradient", "--out", root / "e"],
            "evaluate": ["evaluate", model, folder, "--step", "64", "--out", root / "v"],
            "compare": ["compare", model, folder / "img0.png", "-m", "gradcam", "-m", "gradient",
                        "-o", root / "c.png"],
            "audit": ["audit", model, model, folder, "--out", root / "a"]}[command]


def _on_terminal(args) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); return its exit code and what the
    terminal received."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "onnx_saliency.cli.main", *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    received = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        received += data
    proc.stdout.read()
    os.close(master)
    return proc.wait(timeout=120), received.decode("utf-8", "replace")


@pytest.mark.parametrize("command", sorted(BARS))
def test_progress_bar_on_a_terminal_only(setup, command):
    root, model, folder = setup
    args = _args(command, root, model, folder)
    code, terminal = _on_terminal(args)
    assert code == 0, terminal
    assert BARS[command] in terminal and "100%" in terminal, terminal

    code, quiet = _on_terminal(args + ["--quiet"])
    assert code == 0, quiet
    assert quiet == ""

    piped = subprocess.run([sys.executable, "-m", "onnx_saliency.cli.main", *map(str, args)], capture_output=True,
                           text=True, timeout=300)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
