"""``TorchSegment.try_staged``: the provisional optimizer step the server checks before it keeps a step.

A step whose result is finite is kept bit for bit as the plain step; one that would make a weight or an
optimizer state non-finite raises ``UnsafeUpdate`` and ``discard_pending`` restores B exactly (weights, optimizer
state, BatchNorm statistics), on the first step (no optimizer state yet) and on later ones.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splitexport import OptimizerSpec, TorchSegment
from splitexport._torch_segment import ProvisionalStep, UnsafeUpdate

OPTIMIZERS = {
    "sgd_momentum": OptimizerSpec(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": OptimizerSpec(name="adam", lr=1e-3),
    "adamw": OptimizerSpec(name="adamw", lr=1e-3, weight_decay=0.01),
}


def _segment(opt: OptimizerSpec) -> TorchSegment:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return TorchSegment(module, opt, restorable=True)


def _state(seg: TorchSegment) -> dict[str, object]:
    opt = seg.optimizer.state_dict()
    return {"module": copy.deepcopy(seg.module.state_dict()), "optimizer": copy.deepcopy(opt["state"])}


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _step(seg: TorchSegment, x: torch.Tensor, g: torch.Tensor) -> None:
    seg.forward(x)
    seg.stage_gradient(g)
    seg.try_staged()
    seg.apply_staged()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_kept_steps_equal_plain_steps_and_refused_steps_leave_no_trace(name: str) -> None:
    checked, plain = _segment(OPTIMIZERS[name]), _segment(OPTIMIZERS[name])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=gen)
    huge = torch.full((5, 3), 3e38)  # finite, but squares (Adam) or momentum sums overflow float32
    for step in range(4):
        if step in (0, 2):  # refused before any optimizer state exists, and after some does
            before = _state(checked)
            checked.forward(x)
            checked.stage_gradient(huge)
            with pytest.raises(UnsafeUpdate) as exc:
                checked.try_staged()
            assert exc.value.reason == "non_finite" and "non-finite" in str(exc.value)
            checked.discard_pending()
            assert _same(_state(checked), before)
            assert not checked.has_pending
        g = torch.randn(5, 3, generator=gen) * 1e-2
        _step(checked, x, g)
        plain.forward(x)
        plain.train_with_gradient(g)
        assert _same(_state(checked), _state(plain)), f"step {step}"


def test_finite_weights_whose_sum_overflows_are_kept() -> None:
    """The fast check sums each tensor; a finite tensor whose float32 sum overflows is confirmed finite, not refused."""
    seg = _segment(OPTIMIZERS["sgd_momentum"])
    bias = dict(seg.module.named_parameters())["3.bias"]
    with torch.no_grad():
        bias.fill_(3e38)  # B's outputs stay finite (3e38 + small), the sum of the bias does not
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    seg.forward(x)
    seg.stage_gradient(torch.zeros(5, 3))
    seg.try_staged()
    seg.apply_staged()
    assert torch.isfinite(bias).all() and not torch.isfinite(bias.sum())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_keep_staged_keeps_another_optimizers_step_with_bs_or_neither(name: str) -> None:
    """``keep_staged(other)`` (AdaSplit's mask beside B): checked, a step the other optimizer's parameters would
    not survive is refused and leaves B and the other exactly as before (gradients dropped, nothing pending);
    accepted steps, checked or not, equal the two optimizers' plain steps."""
    spec = OPTIMIZERS[name]

    def build(checked: bool) -> tuple[TorchSegment, torch.Tensor, ProvisionalStep]:
        seg = _segment(spec)
        seg.checked = checked
        other = torch.ones(4, requires_grad=True)
        return seg, other, ProvisionalStep(spec.build([other]), "the other")

    def stage(seg: TorchSegment, other: torch.Tensor, g: torch.Tensor, g_other: torch.Tensor) -> None:
        seg.forward(x)
        seg.stage_gradient(g)
        other.grad = g_other.clone()

    def state(seg: TorchSegment, other: torch.Tensor, step: ProvisionalStep) -> dict[str, object]:
        return {**_state(seg), "other": other.detach().clone(), "other_opt": copy.deepcopy(step.optimizer.state_dict())}

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, generator=gen)
    (seg, other, step), (plain, plain_other, plain_step) = build(True), build(False)
    for k in range(3):
        g, g_other = torch.randn(5, 3, generator=gen) * 1e-2, torch.randn(4, generator=gen)
        if k == 1:  # after some optimizer state exists
            before = state(seg, other, step)
            stage(seg, other, g, torch.full((4,), float("inf")))  # B's gradient is fine, the other's is not
            with pytest.raises(UnsafeUpdate, match="of the other non-finite"):
                seg.keep_staged(step)
            assert _same(state(seg, other, step), before)
            assert other.grad is None and not seg.has_pending and not step.taken
        for s, o, p in ((seg, other, step), (plain, plain_other, plain_step)):
            stage(s, o, g, g_other)
            s.keep_staged(p)
        assert _same(state(seg, other, step), state(plain, plain_other, plain_step)), f"step {k}"
