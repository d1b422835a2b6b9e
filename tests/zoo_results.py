"""Results of the zoo tests, collected for the zoo table of docs/ops.md (``benchmarks/zoo_table.py``).

When ``SPLITEXPORT_ZOO_RESULTS`` names a file, :func:`record` appends one JSON line per measured
(model, segment, format): the largest per-step difference from torch over the run (a float), or
the one-line refusal (a string). Without it, nothing is written.
"""

from __future__ import annotations

import json
import os

ENV = "SPLITEXPORT_ZOO_RESULTS"
FORMATS = ("onnx", "tfjs", "tflite_flex", "tflite_builtin")


def record(model: str, fmt: str, value: float | str, segment: str = "A+C", note: str = "") -> None:
    """Append one result (``fmt`` one of :data:`FORMATS`, or ``dropout_<format>`` for a convergence run)."""
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"model": model, "segment": segment, "format": fmt, "value": value, "note": note}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
