"""SplitFed and FedAvg: device weights are the sample-weighted mean, identical on every client, after a round."""

from __future__ import annotations

import pytest
import torch

from splitexport import Bundle, label_loss, load_dataset
from splitexport.simulation import simulate_clients
from splitexport.strategies import DeviceState, FedAvg, SplitFed, StrategyConfig, average_states

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


class Averages:
    """Records the device weights a strategy's round end hands out (mixed into SplitFed / FedAvg)."""

    sent: list[dict[str, DeviceState]]

    def end_round(self, device_states, num_samples):  # type: ignore[no-untyped-def]
        new = super().end_round(device_states, num_samples)  # type: ignore[misc]
        self.sent = [*getattr(self, "sent", []), {c: {k: v.clone() for k, v in s.items()} for c, s in new.items()}]
        return new


class AveragingSplitFed(Averages, SplitFed):
    pass


class AveragingFedAvg(Averages, FedAvg):
    pass


def _segment(bundle: Bundle, name: str, state: DeviceState) -> torch.nn.Module:
    m = bundle.torch_segment(name)
    m.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == name})
    return m.eval()


@pytest.mark.parametrize("strategy", ["sfl", "fedavg"])
def test_devices_hold_the_round_average(strategy: str, double_bundle: Bundle) -> None:
    """After a round every device evaluates with the average it was sent: the round's test loss (the mean over
    the devices' own models) equals the loss of the averaged model; devices keeping their own weights differ."""
    data = load_dataset("digits")
    server = server_segment(double_bundle) if strategy == "sfl" else None
    link = (AveragingSplitFed if strategy == "sfl" else AveragingFedAvg)(
        server, StrategyConfig(num_clients=3, client_lr=0.05))
    result = simulate_clients(double_bundle, strategy=strategy, clients=3, rounds=1, batch_size=32, link=link,
                              dataset=data, progress=False)
    (sent,) = link.sent
    avg = sent["client00"]
    assert all(torch.equal(s[k], avg[k]) for s in sent.values() for k in avg)
    names = [s.name for s in double_bundle.manifest.segments]
    with torch.no_grad():
        x = data.x_test
        for name in names:
            x = server.evaluate(x) if server is not None and name == "B" else _segment(double_bundle, name, avg)(x)
    loss = float(label_loss(x, data.y_test))
    acc = float((x.argmax(1) == data.y_test).float().mean())
    got = result.rounds[0]
    print(f"{strategy}: round-1 test loss {got.test_loss:.7f} (averaged model {loss:.7f}), "
          f"accuracy {got.test_accuracy:.4f} ({acc:.4f})")
    assert abs(got.test_loss - loss) <= 1e-6 * max(1.0, loss), (got.test_loss, loss)
    assert abs(got.test_accuracy - acc) <= 1e-9
