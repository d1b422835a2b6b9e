"""SSL: clients take turns and relay their device weights; with plain SGD that is single-client training."""

from __future__ import annotations

import torch

from splitexport import OptimizerSpec, SplitModel, TorchSegment, load_dataset
from splitexport.simulation import partition_indices, simulate_clients
from splitexport.simulation.data import batch_indices
from splitexport.strategies import SSL, StrategyConfig

from .conftest import server_segment


class RecordingSSL(SSL):
    """SSL that remembers each client's uploaded device weights."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.turns: list[tuple[str, dict[str, torch.Tensor]]] = []

    def end_turn(self, client, device_state) -> None:  # type: ignore[no-untyped-def]
        super().end_turn(client, device_state)
        self.turns.append((client, {k: v.clone() for k, v in device_state.items()}))


def test_relay_hands_weights_to_the_next_client(single_bundle) -> None:
    ssl = SSL(server_segment(single_bundle), StrategyConfig(num_clients=3, client_lr=0.05))
    assert ssl.device_state_for("a") is None
    state = {"A.fc1.weight": torch.ones(2, 2)}
    ssl.end_turn("a", state)
    assert ssl.device_state_for("a") is None  # its own weights already
    got = ssl.device_state_for("b")
    assert got is not None and torch.equal(got["A.fc1.weight"], state["A.fc1.weight"])


def test_ssl_equals_one_client_training_on_the_relayed_sequence(single_bundle) -> None:
    """3 clients, 2 rounds of SSL == one A | B split model trained on client 0's, 1's, 2's batches in turn."""
    sgd = OptimizerSpec(name="sgd", lr=0.05)
    data = load_dataset("digits")
    link = RecordingSSL(server_segment(single_bundle, optimizer=sgd), StrategyConfig(num_clients=3, client_lr=0.05))
    result = simulate_clients(single_bundle, strategy="ssl", clients=3, rounds=2, batch_size=32, optimizer=sgd,
                              dataset=data, link=link, progress=False)
    assert [c for c, _ in link.turns] == ["client00", "client01", "client02"] * 2
    torch.manual_seed(0)
    model = SplitModel([TorchSegment(single_bundle.torch_segment("A"), sgd, input_grad=False),
                        TorchSegment(single_bundle.torch_segment("B"), sgd)])
    parts = partition_indices(data.y_train, 3, "iid", seed=0)
    for r in range(2):
        for i, idx in enumerate(parts):
            for b in batch_indices(len(idx), 32, seed=i, epoch=r):
                model.step(data.x_train[idx[b]], data.y_train[idx[b]])
    a_ref = model.runners[0].module.state_dict()  # type: ignore[attr-defined]
    last = link.turns[-1][1]
    for k, v in a_ref.items():
        torch.testing.assert_close(last[f"A.{k}"], v, rtol=0, atol=1e-6)
    assert link.server is not None
    for p, q in zip(link.server.module.parameters(), model.runners[1].module.parameters(), strict=True):  # type: ignore[attr-defined]
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # relay traffic: every turn uploads A, every turn after the first downloads it
    a_bytes = sum(v.numel() * 4 for v in a_ref.values())
    assert result.per_client["client00"].bytes_down >= a_bytes  # round 2 starts from client02's weights
