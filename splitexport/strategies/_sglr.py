"""SGLR: PSL with learning-rate splitting (SplitLr) and split-layer gradient averaging (SplitAvg)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from ._base import Hyperparameters
from ._psl import PSL


class SGLRParams(Hyperparameters):
    alpha: float = Field(0.0, allow_inf_nan=False, description="SplitLr: server lr = client lr * clients**alpha")
    phi: float = Field(0.0, ge=0, le=1, description="SplitAvg: fraction of an iteration's clients sharing one "
                       "averaged cut-layer gradient")
    phase_rounds: int | None = Field(None, description="phased SplitAvg: only in the first k rounds (negative: "
                                     "the last |k|); unset: in every round")


class SGLR(PSL):
    """PSL with ``server lr = client lr * C**alpha`` and, for a sampled ``floor(phi * n)`` of an iteration's
    ``n`` clients, their cut-layer gradients replaced by one average that is broadcast to them.

    ``phase_rounds`` (phased SplitAvg, SGLR Table 3): ``k > 0`` averages only in the first k
    rounds, ``k < 0`` only in the last |k|. Only clients whose batch has the iteration's most
    common size can be averaged (a client's last, smaller batch is left out).
    Double split: SplitLr scales B's lr; SplitAvg applies to ``dL/d(B input)``, the gradient
    B sends to A (the gradients C sends to B are the clients' own and are not averaged).
    With ``alpha = phi = 0`` this is PSL.
    """

    name = "sglr"
    Params: ClassVar[type[Hyperparameters]] = SGLRParams
    params: SGLRParams

    def server_lr(self) -> float:
        return self.config.client_lr * self.config.num_clients**self.params.alpha

    def split_avg_active(self) -> bool:
        """Whether SplitAvg runs in the current round (phased training)."""
        k = self.params.phase_rounds
        if k is None:
            return True
        if k >= 0:
            return self.round < k
        return self.round >= self.config.total_rounds + k

    def combine_gradients(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.split_avg_active():
            return local
        if self.reducer is not None:  # B replicated: sample among every replica's clients
            return self.reducer.split_avg(self, local)
        shapes = [tuple(g.shape) for g in local.values()]
        common = max(set(shapes), key=lambda s: (shapes.count(s), s))
        candidates = [c for c, g in local.items() if tuple(g.shape) == common]
        k = min(len(candidates), math.floor(round(self.params.phi * len(local), 9)))
        if k < 2:
            return local
        pick = torch.randperm(len(candidates), generator=self._generator)[:k].tolist()
        active = [candidates[i] for i in sorted(pick)]
        mean = torch.stack([local[c] for c in active]).mean(dim=0)
        self.last_broadcast = frozenset(active)
        return {c: (mean if c in self.last_broadcast else g) for c, g in local.items()}
