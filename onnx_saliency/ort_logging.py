"""onnxruntime's own log, kept off the user's terminal.

onnxruntime writes to stderr by itself: optimiser warnings while a session is built (104 lines for
torchvision's Swin-T, from the sessions onnx-graphsurgeon creates to fold constants) and, when a run fails,
an error line that repeats the exception we turn into our own one-line ``error:``. Sessions we create get
:func:`session_severity`; the process-wide default logger (used by sessions others create, such as
onnx-graphsurgeon's) is set once by :func:`quiet_onnxruntime`, which every entry point calls before
onnxruntime can run. ``ONNX_SALIENCY_ORT_LOG_LEVEL`` (0 verbose, 1 info, 2 warning, 3 error, 4 fatal; default 4)
brings the log back for debugging.
"""

from __future__ import annotations

import os

ENV = "ONNX_SALIENCY_ORT_LOG_LEVEL"
DEFAULT_SEVERITY = 4  # fatal only: every error reaches the user through the exception, as one line
_done = False


def session_severity() -> int:
    try:
        return min(4, max(0, int(os.environ.get(ENV, DEFAULT_SEVERITY))))
    except ValueError:
        return DEFAULT_SEVERITY


def quiet_onnxruntime() -> None:
    """Set onnxruntime's default logger to :func:`session_severity` (once; a no-op without onnxruntime)."""
    global _done
    if _done:
        return
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(session_severity())
    _done = True
