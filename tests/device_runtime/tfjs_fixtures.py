"""Fixtures for the JS runtime's equivalence tests: TF.js artifacts plus torch reference numbers.

``python -m tests.device_runtime.tfjs_fixtures OUT`` writes one folder per case of
:data:`tests.tf_reference.CASES` (``model/`` from the real TF.js exporter, ``case.json``
with inputs, targets and torch's states, losses and input gradients). The node tests in
``device_runtime/js/test`` read them; they run this script themselves when
``SPLITEXPORT_TFJS_FIXTURES`` is not set.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.tf_reference import (
    CASES,
    STATS_TOL,
    STEPS,
    TOL,
    Case,
    Reference,
    reference,
    tf_optimizer_state,
    tf_state,
)


def _tensor(a: np.ndarray) -> dict[str, Any]:
    arr = np.asarray(a)
    if np.issubdtype(arr.dtype, np.integer):
        return {
            "shape": list(arr.shape),
            "dtype": "int32",
            "b64": base64.b64encode(arr.astype("<i4").tobytes()).decode(),
        }
    return {"shape": list(arr.shape), "dtype": "float32", "b64": base64.b64encode(arr.astype("<f4").tobytes()).decode()}


def write_case(case: Case, out: Path) -> None:
    """Export the case's segment to ``out/model`` and write ``out/case.json``."""
    from splitexport.export._layergraph import layer_graph
    from splitexport.export._tfjs import write_tfjs

    ref = reference(case)
    graph = layer_graph(ref.module, ref.input_shape, case.input_dtype)
    write_tfjs(graph, out / "model", is_last=ref.is_last, loss=case.loss, optimizer=case.optimizer)
    write_reference(ref, graph.torch_name_map(), out, case.name, kinks=case.kinks)


def write_reference(ref: Reference, names: dict[str, list[str]], out: Path, name: str, *, kinks: bool = False,
                    gate_steps: int = 0) -> None:
    """``out/case.json``: the torch run ``ref`` in the export's weight names (``names``: torch_names of the meta)."""

    def state(i: int) -> dict[str, Any]:
        return {k: _tensor(v) for k, v in tf_state(names, ref.states[i]).items()}

    steps = []
    for i in range(len(ref.inputs)):
        momentum = {k: _tensor(v) for k, v in tf_optimizer_state(names, ref.momentum[i]).items()}
        steps.append(
            {
                "x": _tensor(ref.inputs[i]),
                "target": _tensor(ref.targets[i]),
                "loss": ref.losses[i],
                "grad_input": _tensor(ref.grad_inputs[i]) if ref.is_last else None,
                "state_before": state(i),
                "momentum_before": momentum,
            }
        )
    doc = {
        "name": name,
        "is_last": ref.is_last,
        "kinks": kinks,
        "gate_steps": gate_steps,
        "tol": TOL,
        "stats_tol": STATS_TOL,
        "steps": steps,
        "final_state": state(len(ref.inputs)),
        "forward0": _tensor(ref.forward0),
        "eval_out": _tensor(ref.eval_out),
    }
    (out / "case.json").write_text(json.dumps(doc))


def write_fixtures(out: Path, cases: list[Case] = CASES) -> list[str]:
    """Write every case under ``out``; returns the case names."""
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        write_case(case, out / case.name)
    (out / "cases.json").write_text(json.dumps({"steps": STEPS, "cases": [c.name for c in cases]}))
    return [c.name for c in cases]


JS = Path(__file__).resolve().parents[2] / "device_runtime" / "js"


def run_js_equivalence(cases: list[Case], tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Node's equivalence test (device_runtime/js/test/equivalence.test.js) on fixtures the real exporter writes
    for ``cases``; its per-case results (``per_step``, ``free``) by case name."""
    node = shutil.which("node")
    assert node, "node (>= 18) is required for the JS device runtime tests"
    write_fixtures(tmp_path / "fixtures", cases)
    results = tmp_path / "results.jsonl"
    env = {**os.environ, "SPLITEXPORT_TFJS_FIXTURES": str(tmp_path / "fixtures"),
           "SPLITEXPORT_TFJS_RESULTS": str(results)}
    proc = subprocess.run([node, "--test", "test/equivalence.test.js"], cwd=JS, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(rows) == {c.name for c in cases}
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.device_runtime.tfjs_fixtures OUT_DIR")
    write_fixtures(Path(sys.argv[1]))
