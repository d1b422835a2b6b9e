"""Sequence layers train on the device like torch: TFLite flex, builtin (or its refusal) and TF.js, 20 steps.

Per case (:mod:`tests.splitexport.export.seq_cases`): before each step the device gets torch's
state; after it, weights and input gradients must be within 1e-5 of torch. Free-running (20 steps
from the exported weights) is asserted too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.splitexport.export.seq_cases import SEQ_CASES
from tests.tf_reference import BATCH, STATS_TOL, STEPS, TOL, Case, Reference, reference

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow")

from splitexport._errors import ExportError
from splitexport.export._tflite import export_tflite_segment

_REFERENCES: dict[str, Reference] = {}


def _cached(case: Case) -> Reference:
    if case.name not in _REFERENCES:
        _REFERENCES[case.name] = reference(case)
    return _REFERENCES[case.name]


@pytest.mark.parametrize("variant", ["flex", "builtin"])
@pytest.mark.parametrize("case", SEQ_CASES, ids=[c.name for c in SEQ_CASES])
def test_seq_tflite_matches_torch(case: Case, variant: str, tmp_path: Path) -> None:
    check_tflite(case, variant, tmp_path)


def test_seq_tfjs_matches_torch(tmp_path: Path) -> None:
    """Every case in the JS runtime (node's equivalence test on fixtures from the real exporter)."""
    check_tfjs(SEQ_CASES, tmp_path)


def check_tflite(case: Case, variant: str, tmp_path: Path) -> float | str:
    """Export ``case`` as TFLite ``variant`` and compare 20 steps with torch (or check the builtin refusal).

    Returns the largest per-step difference, or the refusal message."""
    from device_runtime._tflite import TfliteSegment
    from tests.device_runtime.test_tflite_runtime import _free_running, _per_step, _report

    ref = _cached(case)
    kwargs = {"is_last": ref.is_last, "optimizer": case.optimizer, "loss": case.loss,
              "input_dtype": case.input_dtype, "variants": (variant,), "batch_size": BATCH}
    if variant == "builtin" and not case.builtin:
        with pytest.raises(ExportError, match=r"^layer '[\w.]+' \((GRU|LSTM|MultiheadAttention|TransformerEncoderLayer)\)"
                                              r": not supported by the builtin-ops TFLite variant .*use the flex") as info:
            export_tflite_segment(ref.module, ref.input_shape, tmp_path, **kwargs)  # type: ignore[arg-type]
        assert not list(tmp_path.iterdir())  # nothing written
        return str(info.value)
    export_tflite_segment(ref.module, ref.input_shape, tmp_path, **kwargs)  # type: ignore[arg-type]
    seg = TfliteSegment.from_directory(tmp_path, variant=variant)  # type: ignore[arg-type]
    free = _free_running(seg, ref)
    step = _per_step(seg, ref)
    print(f"\n{case.name} tflite-{variant} {STEPS} steps | {_report('free-running', free)} | {_report('per step', step)}")
    assert step["weights"] <= TOL and step["grad_input"] <= TOL, step
    assert free["forward"] <= TOL and free["loss_rel"] <= TOL, free
    assert free["weights"] <= TOL and free["grad_input"] <= TOL and free["running_stats"] <= STATS_TOL, free
    assert free["evaluate"] <= 10 * TOL, free
    return max(step.values())


def check_tfjs(cases: list[Case], tmp_path: Path) -> dict[str, float]:
    """Every case in the JS runtime (node's equivalence test on fixtures from the real exporter); the largest
    per-step difference by case name."""
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    pytest.importorskip("tensorflowjs")
    from tests.device_runtime.tfjs_fixtures import run_js_equivalence

    rows = run_js_equivalence(cases, tmp_path)
    for case in cases:
        r = rows[case.name]
        print(f"\n{case.name} tfjs: free-running {r['free']} | per step {r['per_step']}")
        assert max(r["per_step"].values()) <= TOL
        assert r["free"]["weights"] <= TOL and r["free"]["grad_input"] <= TOL
    return {case.name: float(max(rows[case.name]["per_step"].values())) for case in cases}
