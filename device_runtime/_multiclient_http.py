"""N simulated devices against ``splitexport serve --strategy ...``: the HTTP mode of the multi-client harness.

:class:`HttpLink` has the methods of :class:`splitexport.strategies.ServerLink`, so
``simulate_clients(bundle, strategy=..., clients=N, link=HttpLink(url, N))`` runs the same
simulation against a real server. Each simulated device has its own session and connection,
and the calls of one iteration are sent concurrently (one thread per device), so the server's
barriers see every device of the iteration at once. See docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

import torch

from splitexport.protocol import DeviceState, ServerReply

from ._client import RemoteSegment, ServerClient

T = TypeVar("T")
R = TypeVar("R")


def client_names(n: int) -> list[str]:
    """The device names ``simulate_clients`` uses (``client00``, ``client01``, ...)."""
    return [f"client{i:02d}" for i in range(n)]


class HttpLink:
    """The server of a multi-client simulation, reached over HTTP (one session per device).

    Sessions are opened in the order of ``clients``, which is the order in which the
    server concatenates an iteration's batches.
    """

    def __init__(self, base_url: str, clients: int | Sequence[str], token: str | None = None, *,
                 fp16: bool = False, timeout: float = 120.0, max_wait_s: float = 300.0) -> None:
        names = client_names(clients) if isinstance(clients, int) else list(clients)
        self.connections = {c: ServerClient(base_url, token, timeout=timeout, max_wait_s=max_wait_s) for c in names}
        self.remotes = {c: RemoteSegment(self.connections[c], fp16=fp16) for c in names}
        self.info: dict[str, Any] = self.connections[names[0]].request("GET", "/v1/strategy").json()
        self.global_steps = self.info["steps"] == "global"
        self.iteration = int(self.info["next_iteration"])
        self.round = int(self.info["round"])
        self.last_broadcast: frozenset[str] = frozenset()
        self._left: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="device")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for c in self.connections.values():
            c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def retries(self) -> int:
        return sum(c.retries for c in self.connections.values())

    def server_lr(self) -> float:
        return float(self.info["server_lr"])

    def _each(self, fn: Callable[[str, T], R], items: Mapping[str, T]) -> dict[str, R]:
        """``fn(client, item)`` for every client at once, one thread each (so the server's barrier fills)."""
        futures = {c: self._pool.submit(fn, c, v) for c, v in items.items()}
        return {c: f.result() for c, f in futures.items()}

    # -- ServerLink --------------------------------------------------------------------------

    def participants(self, round_index: int, clients: Sequence[str]) -> list[str]:
        """Opens the next server iteration; devices without a batch leave the round's iterations first."""
        if not self.global_steps:
            return list(clients)
        present = set(clients)
        for c, remote in self.remotes.items():
            if c not in present and c not in self._left:
                remote.leave_round(self.round)
                self._left.add(c)
        step = self.iteration
        self.iteration += 1
        flags = self._each(lambda c, _: self.remotes[c].participates(step), dict.fromkeys(clients))
        return [c for c in clients if flags[c]]

    def train_round(self, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, ServerReply]:
        if self.info.get("batches_server", True):
            out = self._each(lambda c, xy: self.remotes[c].train_with_labels(*xy), batch)
        else:  # served one client at a time on arrival (AdaSplit): send in client order, so B's updates come in the
            # order the in-process harness uses instead of whichever thread arrives first
            out = {c: self.remotes[c].train_with_labels(*xy) for c, xy in batch.items()}
        self.last_broadcast = frozenset(c for c in batch if self.remotes[c].shared_gradient)
        return {c: ServerReply(grad, loss, output) for c, (loss, grad, output) in out.items()}

    def forward_round(self, activations: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._each(lambda c, x: self.remotes[c].forward(x), activations)

    def backward_round(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self._each(lambda c, g: self.remotes[c].train_with_gradient(g), grads)
        self.last_broadcast = frozenset(c for c in grads if self.remotes[c].shared_gradient)
        return {c: g for c, g in out.items() if g is not None}

    def end_round(self, device_states: Mapping[str, Mapping[str, torch.Tensor]],
                  num_samples: Mapping[str, int]) -> dict[str, DeviceState]:
        """Every device ends the round (those without a state send an empty one); the weights to load."""
        r = self.round

        def end(c: str, _: None) -> dict[str, torch.Tensor]:
            return self.remotes[c].end_round(r, dict(device_states.get(c, {})), int(num_samples.get(c, 0)))

        out = self._each(end, dict.fromkeys(self.remotes))
        self.round += 1
        self._left.clear()
        return {c: s for c, s in out.items() if s}

    def end_turn(self, client: str, device_state: Mapping[str, torch.Tensor]) -> None:
        self.remotes[client].end_turn(dict(device_state))

    def device_state_for(self, client: str) -> DeviceState | None:
        if self.info["device_sync"] != "relay":
            return None
        return self.remotes[client].relayed_state() or None

    def observe(self, client: str, metrics: Mapping[str, float]) -> None:
        self.remotes[client].observe(dict(metrics))

    def evaluate(self, client: str, x: torch.Tensor) -> torch.Tensor:
        return self.remotes[client].evaluate(x)
