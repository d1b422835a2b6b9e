"""SGLR: SplitLr scales the server learning rate; SplitAvg broadcasts one averaged cut-layer gradient."""

from __future__ import annotations

import pytest
import torch

from splitexport.strategies import PSL, SGLR, StrategyConfig

from .conftest import client_batches, server_segment


@pytest.mark.parametrize(("clients", "alpha"), [(4, 0.5), (9, 1.0), (20, 0.0)])
def test_splitlr_sets_server_lr(single_bundle, clients: int, alpha: float) -> None:
    sglr = SGLR(server_segment(single_bundle), StrategyConfig(num_clients=clients, client_lr=0.05, alpha=alpha))
    assert sglr.server is not None
    assert sglr.server_lr() == pytest.approx(0.05 * clients**alpha)
    assert [g["lr"] for g in sglr.server.optimizer.param_groups] == [pytest.approx(0.05 * clients**alpha)]


def test_splitlr_scales_the_server_step(single_bundle) -> None:
    """With plain SGD, alpha = 1 and 4 clients, B moves exactly 4x as far as PSL's B on the same batch."""
    batch = client_batches(4)
    plain = PSL(server_segment(single_bundle), StrategyConfig(num_clients=4, client_lr=0.05))
    scaled = SGLR(server_segment(single_bundle), StrategyConfig(num_clients=4, client_lr=0.05, alpha=1.0))
    start = single_bundle.torch_segment("B")
    plain.train_round(batch)
    scaled.train_round(batch)
    assert plain.server is not None and scaled.server is not None
    for p0, p1, p4 in zip(start.parameters(), plain.server.module.parameters(), scaled.server.module.parameters(),
                          strict=True):
        torch.testing.assert_close(p4 - p0, 4 * (p1 - p0), rtol=1e-4, atol=1e-6)


def test_splitavg_broadcasts_one_averaged_gradient(single_bundle) -> None:
    batch = client_batches(6)
    local = PSL(server_segment(single_bundle), StrategyConfig(num_clients=6, client_lr=0.05)).train_round(batch)
    sglr = SGLR(server_segment(single_bundle), StrategyConfig(num_clients=6, client_lr=0.05, phi=0.5, seed=3))
    replies = sglr.train_round(batch)
    active = sglr.last_broadcast
    assert len(active) == 3  # floor(phi * C)
    mean = torch.stack([local[c].grad for c in sorted(active)]).mean(dim=0)  # type: ignore[misc]
    for c, reply in replies.items():
        expected = mean if c in active else local[c].grad
        assert reply.grad is not None and expected is not None
        torch.testing.assert_close(reply.grad, expected, rtol=1e-5, atol=1e-8)
    assert len({id(replies[c].grad) for c in active}) == 1  # literally one tensor for the active clients


def test_splitavg_samples_different_clients_and_skips_odd_batches(single_bundle) -> None:
    sglr = SGLR(server_segment(single_bundle), StrategyConfig(num_clients=4, client_lr=0.05, phi=1.0))
    batch = client_batches(4)
    x, y = batch["c3"]
    batch["c3"] = (x[:5], y[:5])  # a last, smaller batch cannot join the average
    sglr.train_round(batch)
    assert sglr.last_broadcast == frozenset({"c0", "c1", "c2"})
    picks = set()
    sglr = SGLR(server_segment(single_bundle), StrategyConfig(num_clients=8, client_lr=0.05, phi=0.25))
    for seed in range(6):
        sglr.train_round(client_batches(8, seed=seed))
        picks.add(sglr.last_broadcast)
    assert len(picks) > 1 and all(len(p) == 2 for p in picks)


@pytest.mark.parametrize(("phase", "averaged_rounds"), [(None, [0, 1, 2, 3]), (2, [0, 1]), (-1, [3]), (0, [])])
def test_phased_splitavg(single_bundle, phase: int | None, averaged_rounds: list[int]) -> None:
    cfg = StrategyConfig(num_clients=4, client_lr=0.05, phi=1.0, phase_rounds=phase, total_rounds=4)
    sglr = SGLR(server_segment(single_bundle), cfg)
    seen = []
    for r in range(4):
        sglr.train_round(client_batches(4, seed=r))
        if sglr.last_broadcast:
            seen.append(r)
        sglr.end_round({}, {})
    assert seen == averaged_rounds


def test_double_split_averages_the_gradient_sent_to_a(double_bundle) -> None:
    gen = torch.Generator().manual_seed(0)
    acts = {f"c{i}": torch.rand(6, 64, generator=gen) for i in range(4)}
    sglr = SGLR(server_segment(double_bundle), StrategyConfig(num_clients=4, client_lr=0.05, phi=0.5, alpha=0.5))
    outs = sglr.forward_round(acts)
    back = sglr.backward_round({c: torch.rand_like(o, generator=gen) for c, o in outs.items()})
    active = sorted(sglr.last_broadcast)
    assert len(active) == 2 and torch.equal(back[active[0]], back[active[1]])
    others = [c for c in back if c not in active]
    assert not torch.equal(back[others[0]], back[others[1]])
