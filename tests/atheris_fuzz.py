"""Coverage-guided fuzzing with atheris (libFuzzer) of the model loader, the image loader and the annotation
parser: any exception other than SaliencyError is a crash. Not collected by pytest; tests/test_fuzz.py runs
it briefly when atheris is installed (pip install atheris; wheels exist for CPython on x86-64 Linux).

    python tests/atheris_fuzz.py model|image|annotations|all [libFuzzer flags, e.g. -runs=2000 -seed=1]

FUZZ_SEEDS (os.pathsep-separated files) seeds the corpus; with `all`, prefix each seed with its target's
byte (0 model, 1 image, 2 annotations).
"""

import os
import sys
import tempfile
from pathlib import Path

import atheris
import cv2  # noqa: F401  third-party modules load uninstrumented: coverage is wanted for ours only
import numpy  # noqa: F401
import onnx  # noqa: F401

with atheris.instrument_imports(include=["onnx_saliency", "graph_passes"]):
    from onnx_saliency.evaluation import annotations
    from onnx_saliency.errors import SaliencyError
    from onnx_saliency.intake.model import load_model
    from onnx_saliency.intake.preprocess import load_image

WORK = Path(tempfile.mkdtemp(prefix="atheris-"))


def _model(path: Path) -> None:
    load_model(path)


def _image(path: Path) -> None:
    load_image(path, max_pixels=1 << 20)


TARGETS = {"model": (_model, "m.onnx"), "image": (_image, "img.bin"),
           "annotations": (annotations.load_annotations, "ann.json")}


def main() -> None:
    chosen = list(TARGETS) if sys.argv[1] == "all" else [sys.argv[1]]

    def one_input(data: bytes) -> None:
        # "all": the first byte picks the target, so one process (one start-up) fuzzes the three
        key = chosen[data[0] % len(chosen)] if len(chosen) > 1 and data else chosen[0]
        target, name = TARGETS[key]
        path = WORK / name
        path.write_bytes(data[1:] if len(chosen) > 1 else data)
        try:
            target(path)
        except SaliencyError as err:
            if "\n" in str(err):
                raise AssertionError(f"multi-line error: {err!r}") from err

    seeds = WORK / "seeds"
    seeds.mkdir(exist_ok=True)
    for i, seed in enumerate(os.environ.get("FUZZ_SEEDS", "").split(os.pathsep)):
        if seed:
            (seeds / f"seed{i}").write_bytes(Path(seed).read_bytes())
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(seeds)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
