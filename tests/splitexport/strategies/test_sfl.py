"""SplitFed and FedAvg: device weights are the sample-weighted mean, identical on every client, after a round."""

from __future__ import annotations

import torch

from splitexport._multiclient import simulate_clients
from splitexport.strategies import FedAvg, SplitFed, StrategyConfig, average_states

from .conftest import server_segment


def _states(n: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {f"c{i}": {"A.w": torch.rand(3, 4, generator=gen), "A.bn.num_batches_tracked": torch.tensor(i + 1)}
            for i in range(n)}


def test_average_is_sample_weighted() -> None:
    states = _states(3)
    avg = average_states(states, {"c0": 1, "c1": 1, "c2": 2})
    torch.testing.assert_close(avg["A.w"], 0.25 * states["c0"]["A.w"] + 0.25 * states["c1"]["A.w"]
                               + 0.5 * states["c2"]["A.w"])
    assert int(avg["A.bn.num_batches_tracked"]) == 3


def test_sfl_end_round_gives_every_client_the_same_weights(single_bundle) -> None:
    sfl = SplitFed(server_segment(single_bundle), StrategyConfig(num_clients=3, client_lr=0.05))
    states = _states(3)
    new = sfl.end_round(states, {"c0": 10, "c1": 10, "c2": 10})
    assert set(new) == set(states) and sfl.round == 1
    for c in new:
        assert torch.equal(new[c]["A.w"], new["c0"]["A.w"])
    assert new["c0"]["A.w"] is not new["c1"]["A.w"]  # copies, not one shared tensor


class RecordingSplitFed(SplitFed):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.uploaded: list[dict[str, dict[str, torch.Tensor]]] = []

    def end_round(self, device_states, num_samples):  # type: ignore[no-untyped-def]
        self.uploaded.append({c: dict(s) for c, s in device_states.items()})
        return super().end_round(device_states, num_samples)


def test_sfl_clients_start_each_round_identical(double_bundle) -> None:
    """In the harness: round 2's uploads differ (clients trained apart), but all started from one average."""
    link = RecordingSplitFed(server_segment(double_bundle), StrategyConfig(num_clients=3, client_lr=0.05))
    result = simulate_clients(double_bundle, strategy="sfl", clients=3, rounds=2, batch_size=32, link=link,
                              progress=False)
    assert len(link.uploaded) == 2
    first, second = link.uploaded
    keys = first["client00"].keys()
    assert {k.split(".")[0] for k in keys} == {"A", "C"}  # both device segments are averaged
    assert any(not torch.equal(second["client00"][k], second["client01"][k]) for k in keys)
    # weights each client uploads + the average it downloads
    size = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in first["client00"].values())
    per = result.per_client["client00"]
    assert per.bytes_down >= 2 * size and per.bytes_up >= 2 * size


def test_fedavg_trains_whole_model_on_devices(single_bundle) -> None:
    fed = FedAvg(None, StrategyConfig(num_clients=2, client_lr=0.05))
    assert fed.participants(0, ["a", "b"]) == []
    result = simulate_clients(single_bundle, strategy="fedavg", clients=2, rounds=1, batch_size=32, progress=False)
    flops = result.config["segment_flops"]
    per = result.per_client["client00"]
    # only weights cross the network: the whole model (A and B) up and the average down, once per round
    assert per.bytes_up == per.bytes_down > 0 and per.server_flops == 0
    assert per.device_flops == 3 * (flops["A"] + flops["B"]) * 674
