"""Sequential split learning (SSL, vanilla SL): one client at a time, device weights relayed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..protocol import DeviceState
from ._base import DeviceSync, Strategy


class SSL(Strategy):
    """Clients take turns; each trains on all its batches, then hands its device weights to the next.

    The relay goes through the server (the "centralized" SL variant): the finishing
    client uploads its segments (:meth:`end_turn`), the next one downloads them
    (:meth:`device_state_for`). Double split: A and C are relayed together.
    """

    name = "ssl"
    splits = frozenset({"single", "double"})
    device_sync: ClassVar[DeviceSync] = "relay"
    batches_server = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._relay: DeviceState | None = None
        self._relay_from: str | None = None

    def end_turn(self, client: str, device_state: Mapping[str, torch.Tensor]) -> None:
        self._relay = {k: v.detach().clone() for k, v in device_state.items()}
        self._relay_from = client

    def device_state_for(self, client: str) -> DeviceState | None:
        if self._relay is None or client == self._relay_from:
            return None
        return {k: v.clone() for k, v in self._relay.items()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "relay": self._relay, "relay_from": self._relay_from}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._relay, self._relay_from = state.get("relay"), state.get("relay_from")
