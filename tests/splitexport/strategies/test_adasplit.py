"""AdaSplit: no server gradient ever reaches a client, the UCB picks ceil(eta * N), masks gate B's updates."""

from __future__ import annotations

import math

import pytest
import torch

from splitexport.simulation import simulate_clients
from splitexport.strategies import AdaSplit, StrategyConfig, UCBOrchestrator, make_strategy

from .conftest import client_batches, server_segment


def _adasplit(bundle, **kw) -> AdaSplit:  # type: ignore[no-untyped-def]
    cfg = StrategyConfig(**{"num_clients": 4, "client_lr": 0.05, **kw})
    strategy = make_strategy("adasplit", server_segment(bundle, input_grad=False), cfg)
    assert isinstance(strategy, AdaSplit)
    return strategy


def test_server_replies_carry_no_gradient(single_bundle) -> None:
    ada = _adasplit(single_bundle)
    batch = client_batches(1)
    reply = ada.train_round(batch)["c0"]
    assert reply.grad is None and reply.loss is not None and reply.output is not None


def test_clients_never_receive_anything_in_the_harness(single_bundle) -> None:
    result = simulate_clients(single_bundle, strategy="adasplit", clients=3, rounds=2, batch_size=64, kappa=0.5,
                              eta=0.5, progress=False)
    assert all(u.bytes_down == 0 for u in result.per_client.values())
    assert result.server_bytes_down == 0
    # the local phase (round 1 of 2) has no traffic at all; the global phase sends activations and labels
    assert result.rounds[0].bytes == 0 and result.rounds[1].bytes > 0
    assert sum(u.bytes_up for u in result.per_client.values()) == result.total_bytes


@pytest.mark.parametrize(("n", "eta"), [(5, 0.6), (10, 0.3), (7, 0.5), (3, 1.0), (20, 0.05)])
def test_ucb_picks_exactly_ceil_eta_n(n: int, eta: float) -> None:
    ucb = UCBOrchestrator(eta, gamma=0.87, seed=1)
    clients = [f"c{i}" for i in range(n)]
    counts = dict.fromkeys(clients, 0)
    for t in range(30):
        picked = ucb.select(clients)
        assert len(picked) == len(set(picked)) == math.ceil(eta * n)
        for c in picked:
            counts[c] += 1
            ucb.record(c, 1.0 + (3.0 if c == "c0" else 0.0))  # c0 keeps a high server loss
    assert min(counts.values()) > 0  # exploration reaches everyone
    if 0.3 <= eta < 1.0:
        assert counts["c0"] == max(counts.values())  # exploitation favours the client that needs the server


def test_local_phase_has_no_participants(single_bundle) -> None:
    ada = _adasplit(single_bundle, kappa=0.6, eta=0.5, total_rounds=5)
    clients = ["a", "b", "c", "d"]
    assert [len(ada.participants(r, clients)) for r in range(5)] == [0, 0, 0, 2, 2]


def test_masks_gate_server_updates_and_are_per_client(single_bundle) -> None:
    ada = _adasplit(single_bundle, lam=1e-2)
    assert ada.server is not None
    batch = client_batches(2)
    name = ada.masks.names[0]
    mask = ada.masks.mask("c0")[name]
    with torch.no_grad():
        mask[:, : mask.shape[1] // 2] = 0.0  # c0 may not touch the first half of the columns
    before = dict(ada.server.module.named_parameters())[name].detach().clone()
    ada.train_round({"c0": batch["c0"]})
    after = dict(ada.server.module.named_parameters())[name].detach()
    half = mask.shape[1] // 2
    assert torch.equal(after[:, :half], before[:, :half]) and not torch.equal(after[:, half:], before[:, half:])
    ada.train_round({"c1": batch["c1"]})
    m0, m1 = ada.masks.mask("c0")[name], ada.masks.mask("c1")[name]
    assert not torch.equal(m0, m1) and float(m1.detach().max()) < 1.0  # L1 pulled c1's mask below its start of 1
    # the client's view of B is W * m: evaluation differs per client
    x = batch["c0"][0]
    assert not torch.equal(ada.evaluate("c0", x), ada.evaluate("c1", x))


def test_checkpoint_round_trip(single_bundle) -> None:
    ada = _adasplit(single_bundle, kappa=0.0)
    batch = client_batches(4)
    for c in ada.participants(0, list(batch)):
        ada.train_round({c: batch[c]})
    state = ada.state_dict()
    other = _adasplit(single_bundle, kappa=0.0)
    other.load_state_dict(state)
    assert other.participants(0, list(batch)) == ada.participants(0, list(batch))
    x = batch["c0"][0]
    assert torch.equal(other.evaluate("c0", x), ada.evaluate("c0", x))
