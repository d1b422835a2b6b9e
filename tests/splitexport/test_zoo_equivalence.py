"""Torch split training equals monolithic training on every zoo model (issue 10's model zoo)."""

from __future__ import annotations

import copy

import pytest
import torch

from splitexport import MonolithicModel, OptimizerSpec, max_abs_difference, named_state, partition, torch_split_model
from tests.zoo import ZOO

STEPS = 20
TOL = 1e-5
OPT = OptimizerSpec(name="sgd", lr=0.05, momentum=0.9)


@pytest.mark.parametrize("split", ["single", "double"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_split_equals_monolithic(name: str, split: str) -> None:
    zm = ZOO[name]
    torch.manual_seed(0)
    model = zm.factory()
    part = partition(model, zm.cuts[split], zm.example())
    assert part.segments[0].module is not model
    mono = MonolithicModel(copy.deepcopy(model), OPT, loss=zm.loss)
    split_model = torch_split_model([s.module for s in part.segments], OPT, loss=zm.loss)
    x, y = zm.data(STEPS * 16, 0)
    worst = 0.0
    for step in range(STEPS):
        xb, yb = x[step * 16 : (step + 1) * 16], y[step * 16 : (step + 1) * 16]
        torch.manual_seed(step)  # the same Dropout masks in both runs (drawn in the same order)
        loss_split, _ = split_model.step(xb, yb)
        torch.manual_seed(step)
        loss_mono, _ = mono.step(xb, yb)
        assert abs(loss_split - loss_mono) <= TOL * max(1.0, abs(loss_mono)), (step, loss_split, loss_mono)
        diff, where = max_abs_difference(named_state([s.module for s in part.segments]), mono.module.state_dict())
        worst = max(worst, diff)
        assert diff <= TOL, f"step {step}: {where} differs by {diff}"
    print(f"{name} {split}: max |dw| over {STEPS} steps = {worst:.2e}")
