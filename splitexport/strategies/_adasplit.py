"""AdaSplit (single split): local-loss clients, a UCB orchestrator, per-client sparse masks on B."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field

from .._torch_segment import TorchSegment
from ..protocol import ServerReply
from ._base import DeviceSync, Hyperparameters, Strategy, StrategyConfig
from ._devices import Device, LocalLossClient
from ._masks import ClientMasks
from ._ucb import UCBOrchestrator


class AdaSplitParams(Hyperparameters):
    kappa: float = Field(0.5, ge=0, le=1, description="fraction of the rounds in the local phase (no server)")
    eta: float = Field(0.5, gt=0, le=1, description="fraction of the clients the orchestrator picks per iteration")
    lam: float = Field(1e-4, ge=0, allow_inf_nan=False, description="L1 weight of the per-client server masks")
    gamma: float = Field(0.87, ge=0, le=1, description="discount of the UCB orchestrator's statistics")


class AdaSplit(Strategy):
    """AdaSplit (Chopra et al.) on an A | B split.

    Devices train A with a supervised NT-Xent loss on a projection head (see
    :func:`supervised_nt_xent`) and never receive a server gradient. The first
    ``floor(kappa * total_rounds)`` rounds are the local phase (no participants, no
    traffic); afterwards the UCB orchestrator picks ``ceil(eta * N)`` clients per
    iteration, and B trains on each one's activations through that client's mask.
    Only the single split is supported: in A | B | C the device's C would need B's
    output (server -> device traffic every step) and would train B through C's
    gradient, which removes both savings that define AdaSplit.
    """

    name = "adasplit"
    splits = frozenset({"single"})
    device_sync: ClassVar[DeviceSync] = "independent"
    batches_server = False
    sends_gradient = False
    device: ClassVar[type[Device]] = LocalLossClient
    Params: ClassVar[type[Hyperparameters]] = AdaSplitParams
    params: AdaSplitParams

    def __init__(self, server: TorchSegment | None, config: StrategyConfig) -> None:
        super().__init__(server, config)
        self.masks = ClientMasks(self._require_server(), self.params.lam)
        self.orchestrator = UCBOrchestrator(self.params.eta, self.params.gamma, seed=config.seed)

    @property
    def local_rounds(self) -> int:
        return int(round(self.params.kappa * self.config.total_rounds, 9) // 1)

    def in_local_phase(self, round_index: int) -> bool:
        return round_index < self.local_rounds

    def participants(self, round_index: int, clients: Sequence[str]) -> list[str]:
        if self.in_local_phase(round_index) or not clients:
            return []
        return self.orchestrator.select(list(clients))

    def train_round(self, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, ServerReply]:
        self._check_clients(batch)
        ((client, (x, y)),) = batch.items()
        loss, out = self.masks.train_step(client, x, y)
        self.orchestrator.record(client, loss)
        self.last_broadcast = frozenset()
        return {client: ServerReply(None, loss, out)}

    def forward_round(self, activations: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError("AdaSplit supports only the single split (A | B)")

    def backward_round(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError("AdaSplit supports only the single split (A | B)")

    @torch.no_grad()
    def evaluate(self, client: str, x: torch.Tensor) -> torch.Tensor:
        return self.masks.evaluate(client, x)

    def summary(self, clients: Sequence[str]) -> dict[str, float]:
        return {"mask_sparsity": sum(self.masks.sparsity(c) for c in clients) / len(clients)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masks": self.masks.state_dict(), "ucb": self.orchestrator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.masks.load_state_dict(state["masks"])
        self.orchestrator.load_state_dict(state["ucb"])
