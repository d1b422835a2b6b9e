"""AdaSplit's orchestrator: a discounted UCB bandit that picks ``ceil(eta * N)`` clients per iteration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

INITIAL_LOSS = 100.0
"""AdaSplit initialises ``L_i^t = 100`` for t = 0 and 1."""


class UCBOrchestrator:
    """Scores ``A_i = l_i / s_i + sqrt(2 log T / s_i)`` (AdaSplit eq. 6) and selects the top-k clients.

    ``l_i`` and ``s_i`` are ``gamma``-discounted sums of the client's server losses
    and selection flags; an unselected client's loss for an iteration is the mean
    of its previous two. Never-selected clients (``s_i = 0``) score infinity, ties
    break in a seeded random order.
    """

    def __init__(self, eta: float, gamma: float, seed: int = 0) -> None:
        self.eta = eta
        self.gamma = gamma
        self.iterations = 0
        self.l: dict[str, float] = {}
        self.s: dict[str, float] = {}
        self.history: dict[str, tuple[float, float]] = {}
        self.selected: list[str] = []
        self.losses: dict[str, float] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def count(self, num_clients: int) -> int:
        """How many clients an iteration selects: ``ceil(eta * N)``."""
        return min(num_clients, max(1, math.ceil(round(self.eta * num_clients, 9))))

    def scores(self, clients: Sequence[str]) -> dict[str, float]:
        t = max(self.iterations, 1)
        out = {}
        for c in clients:
            s = self.s.get(c, 0.0)
            out[c] = math.inf if s <= 1e-12 else self.l.get(c, 0.0) / s + math.sqrt(2 * math.log(t) / s)
        return out

    def select(self, clients: Sequence[str]) -> list[str]:
        """Close the previous iteration and pick this one's clients."""
        self._close()
        scores = self.scores(clients)
        order = torch.randperm(len(clients), generator=self._generator).tolist()
        ranked = sorted(range(len(clients)), key=lambda i: (-scores[clients[i]], order[i]))
        self.selected = [clients[i] for i in sorted(ranked[: self.count(len(clients))])]
        for c in clients:
            self.history.setdefault(c, (INITIAL_LOSS, INITIAL_LOSS))
        return list(self.selected)

    def record(self, client: str, loss: float) -> None:
        """The server loss of a selected client in the current iteration."""
        self.losses[client] = loss

    def _close(self) -> None:
        if not self.history:
            return
        for c, (prev1, prev2) in self.history.items():
            chosen = c in self.selected and c in self.losses
            loss = self.losses[c] if chosen else (prev1 + prev2) / 2
            self.l[c] = self.gamma * self.l.get(c, 0.0) + loss
            self.s[c] = self.gamma * self.s.get(c, 0.0) + (1.0 if chosen else 0.0)
            self.history[c] = (loss, prev1)
        self.iterations += 1
        self.selected, self.losses = [], {}

    def state_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "l": dict(self.l), "s": dict(self.s), "history": dict(self.history),
                "selected": list(self.selected), "losses": dict(self.losses), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iterations = int(state["iterations"])
        self.l, self.s = dict(state["l"]), dict(state["s"])
        self.history = {k: (float(v[0]), float(v[1])) for k, v in state["history"].items()}
        self.selected, self.losses = list(state["selected"]), dict(state["losses"])
        self._generator.set_state(state["generator"])
