"""TFLite device runtime: both export variants train exactly like torch (SGD, 20 steps)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

from tests.tf_reference import (
    BATCH,
    CASES,
    STATS_TOL,
    STEPS,
    TOL,
    Case,
    Reference,
    max_diff,
    max_rel_diff,
    reference,
    tf_optimizer_state,
    tf_state,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from device_runtime._tflite import TfliteRuntimeError, TfliteSegment
from splitexport.export._tflite import export_tflite_segment


@functools.cache
def _cached(name: str) -> Reference:
    return reference(next(c for c in CASES if c.name == name))


def _reference(case: Case) -> Reference:
    return _cached(case.name)


def _free_running(seg: TfliteSegment, ref: Reference) -> dict[str, float]:
    """Train from the initial weights for all steps; compare the end state and every input gradient."""
    diffs = {"forward": float(np.max(np.abs(seg.forward(ref.inputs[0]) - ref.forward0)))}
    grad_diff = loss_diff = 0.0
    for i, (x, target) in enumerate(zip(ref.inputs, ref.targets)):
        if ref.is_last:
            loss, gx = seg.train_with_labels(x, target)
            grad_diff = max(grad_diff, float(np.max(np.abs(gx - ref.grad_inputs[i]))))
        else:
            loss = seg.train_with_gradient(x, target)
        loss_diff = max(loss_diff, abs(loss - ref.losses[i]) / max(1.0, abs(ref.losses[i])))
    params = seg.parameters()
    stats = [k for k in ref.state if "running_" in k]
    diffs.update(
        weights=max_diff(params, ref.state, [k for k in ref.state if k not in stats]),
        running_stats=max_rel_diff(params, ref.state, stats) if stats else 0.0,
        grad_input=grad_diff,
        loss_rel=loss_diff,
        evaluate=float(np.max(np.abs(seg.evaluate(ref.inputs[0]) - ref.eval_out))),
    )
    return diffs


def _per_step(seg: TfliteSegment, ref: Reference) -> dict[str, float]:
    """Before every step load torch's state (weights, BN statistics, momentum) and compare one step."""
    names = seg.meta["torch_names"]
    weights = stats = grad = 0.0
    for i, (x, target) in enumerate(zip(ref.inputs, ref.targets)):
        slots = {e["name"] for e in seg.meta["state"]} - set(names)  # optimizer slots and step: torch's or zero
        state = {k: np.zeros_like(v) if k in slots else v for k, v in seg.state().items()}
        state.update(tf_state(names, ref.states[i]))
        state.update(tf_optimizer_state(names, ref.momentum[i]))
        seg.load_state(state)
        if ref.is_last:
            _, gx = seg.train_with_labels(x, target)
            grad = max(grad, float(np.max(np.abs(gx - ref.grad_inputs[i]))))
        else:
            seg.train_with_gradient(x, target)
        params, after = seg.parameters(), ref.states[i + 1]
        keys = [k for k in after if "running_" not in k]
        weights = max(weights, max_diff(params, after, keys))
        if len(keys) < len(after):
            stats = max(stats, max_rel_diff(params, after, [k for k in after if "running_" in k]))
    return {"weights": weights, "running_stats": stats, "grad_input": grad}


def _report(label: str, diffs: dict[str, float]) -> str:
    return f"{label}: " + ", ".join(f"{k}={v:.1e}" for k, v in diffs.items())


@pytest.mark.parametrize("variant", ["flex", "builtin"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tflite_matches_torch(case: Case, variant: str, tmp_path: Path) -> None:
    if variant == "builtin" and not case.builtin:
        pytest.skip("layer not supported by the builtin-ops variant (checked in test_tflite_export.py)")
    ref = _reference(case)
    export_tflite_segment(
        ref.module,
        ref.input_shape,
        tmp_path,
        is_last=ref.is_last,
        optimizer=case.optimizer,
        loss=case.loss,
        input_dtype=case.input_dtype,  # type: ignore[call-arg]  # popped by segment_exporter before write_tflite
        variants=(variant,),  # type: ignore[arg-type]
        batch_size=BATCH,
    )
    seg = TfliteSegment.from_directory(tmp_path, variant=variant)  # type: ignore[arg-type]
    free = _free_running(seg, ref)
    step = _per_step(seg, ref)
    print(
        f"\n{case.name} tflite-{variant} {STEPS} steps | "
        + _report("free-running", free)
        + " | "
        + _report("per step", step)
    )
    assert step["weights"] <= TOL and step["grad_input"] <= TOL and step["running_stats"] <= TOL, step
    assert free["forward"] <= TOL and free["loss_rel"] <= TOL, free
    if not case.kinks:
        assert free["weights"] <= TOL and free["grad_input"] <= TOL and free["running_stats"] <= STATS_TOL, free
        assert free["evaluate"] <= 10 * TOL, free


def test_tflite_checkpoint_roundtrip_and_errors(tmp_path: Path) -> None:
    ref = _reference(CASES[1])  # mlp C
    export_tflite_segment(ref.module, ref.input_shape, tmp_path, is_last=True, batch_size=BATCH)
    seg = TfliteSegment.from_directory(tmp_path, variant="builtin")
    before = seg.parameters()
    ckpt = seg.save_checkpoint(tmp_path / "ckpt.safetensors")
    seg.train_with_labels(ref.inputs[0], ref.targets[0])
    assert max_diff(seg.parameters(), before) > 0  # training moved the weights
    seg.load_checkpoint(ckpt)
    assert max_diff(seg.parameters(), before) == 0.0
    with pytest.raises(TfliteRuntimeError, match="batches of 16"):
        seg.train_with_labels(ref.inputs[0][:4], ref.targets[0][:4])
    with pytest.raises(TfliteRuntimeError, match="train_with_labels"):
        seg.train_with_gradient(ref.inputs[0], np.zeros((BATCH, 10), np.float32))
    with pytest.raises(TfliteRuntimeError, match="inputs of shape"):
        seg.evaluate(np.zeros((BATCH, 3), np.float32))
    flex = TfliteSegment.from_directory(tmp_path, variant="flex")
    assert flex.evaluate(ref.inputs[0][:3]).shape == (3, 10)  # the flex variant takes any batch
