"""FedAvg: the federated baseline; each client trains the whole model, the server only averages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from .._torch_segment import TorchSegment
from ._base import DeviceSync, Strategy, StrategyConfig
from ._devices import Device, FullModelClient


class FedAvg(Strategy):
    """No server segment: clients train every segment locally for a round, then load the weighted mean.

    The split kind does not matter (the "device state" is all segments).
    """

    name = "fedavg"
    splits = frozenset({"single", "double"})
    device_sync: ClassVar[DeviceSync] = "average"
    needs_server = False
    device: ClassVar[type[Device]] = FullModelClient

    def __init__(self, server: TorchSegment | None, config: StrategyConfig) -> None:
        super().__init__(None, config)

    def participants(self, round_index: int, clients: Sequence[str]) -> list[str]:
        return []
