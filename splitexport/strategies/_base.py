"""The interface every multi-client strategy implements, and the pieces they share.

Vocabulary: an *iteration* is one server step over the mini-batches that the
iteration's clients sent (``train_round`` for a single split A | B,
``forward_round`` + ``backward_round`` for a double split A | B | C); a *round*
is one pass of every client over its local data, closed by ``end_round``.

A strategy owns everything the server needs between calls (segment B and its
optimizer, the learning rate, sampling state, masks, UCB statistics) and nothing
about transport: the in-process simulation and the HTTP server call the same
methods. Strategies whose ``batches_server`` is False get one client per call;
the others get all of an iteration's clients at once and take one B step over
their concatenated batch.

Weighting (PSL eq. 4-5 of the SGLR paper): B trains on ``sum_i delta_i L_i`` with
``delta_i = n_i / sum_k n_k`` over the iteration's clients, and each client gets
its *local* cut-layer gradient ``dL_i/d(a_i)`` (its own mean loss), so one client
alone is exactly single-client split learning.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .._torch_segment import TorchSegment
from .._update_rule import label_loss
from ..protocol import DeviceState, ServerReply
from ._devices import Device, SplitClient

if TYPE_CHECKING:
    from ._reduce import Collectives

Split = Literal["single", "double"]
DeviceSync = Literal["independent", "relay", "average"]


class Hyperparameters(BaseModel):
    """A strategy's own hyperparameters (its ``Params``); none by default.

    Declare each as a pydantic field with a default, its bounds and a ``description``: the ``simulate`` and
    ``serve`` flags and the ``ServerSettings`` fields are generated from these (``strategies.hyperparameter_fields``).
    Fields of other strategies in a :class:`StrategyConfig` are ignored.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")


class StrategyConfig(BaseModel):
    """One multi-client run: the clients, their learning rate, the rounds and the seed, plus hyperparameters.

    Hyperparameters are passed flat by name (``StrategyConfig(num_clients=4, client_lr=0.05, phi=0.5)``); each
    strategy validates and reads its own through its ``Params`` model (``Strategy.params``).
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    num_clients: int = Field(ge=1, description="C, the number of clients")
    client_lr: float = Field(gt=0, allow_inf_nan=False, description="the devices' learning rate")
    total_rounds: int = Field(10, ge=1, description="total rounds (phased SplitAvg, AdaSplit phases)")
    seed: int = Field(0, description="seed of the strategy's sampling")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The strategy hyperparameters given by name (not the run fields above)."""
        return dict(self.model_extra or {})


class Strategy(ABC):
    """One multi-client split-learning algorithm, server side."""

    name: ClassVar[str]
    splits: ClassVar[frozenset[str]]
    """The split kinds the strategy supports: ``{"single"}``, ``{"double"}`` or both."""
    device_sync: ClassVar[DeviceSync] = "independent"
    """How device weights are shared: not at all, relayed client to client (SSL), or averaged (SFL, FedAvg)."""
    batches_server: ClassVar[bool] = False
    """True: one B step per iteration over all of its clients' concatenated batches (the PSL family)."""
    sends_gradient: ClassVar[bool] = True
    """False: devices train on a local loss and never receive a server gradient (AdaSplit)."""
    needs_server: ClassVar[bool] = True
    """False: no server segment; every client trains the whole model (FedAvg)."""
    device: ClassVar[type[Device]] = SplitClient
    """The device procedure: what each device runs and sends (:mod:`splitexport.strategies._devices`)."""
    Params: ClassVar[type[Hyperparameters]] = Hyperparameters
    """The strategy's hyperparameters (validated from the config when the strategy is built)."""

    def __init__(self, server: TorchSegment | None, config: StrategyConfig) -> None:
        if self.needs_server and server is None:
            raise ValueError(f"strategy {self.name!r} needs a server segment")
        self.server = server
        self.config = config
        self.params = self.Params.model_validate(config.hyperparameters)
        """The strategy's own hyperparameters (``ValidationError``, a ``ValueError``, when one is out of range)."""
        self.round = 0
        """Rounds completed (advanced by :meth:`end_round`)."""
        self.last_broadcast: frozenset[str] = frozenset()
        """Clients that received one shared gradient in the last backward step (sent once, SplitAvg)."""
        self._generator = torch.Generator().manual_seed(config.seed)
        self._pending_round: tuple[list[str], list[int]] | None = None
        self.reducer: Collectives | None = None
        """Set when B is replicated over ranks (:mod:`._reduce`): iterations and round ends span every rank."""
        if server is not None:
            for group in server.optimizer.param_groups:
                group["lr"] = self.server_lr()

    # -- learning rate and participation -------------------------------------------------

    def server_lr(self) -> float:
        """B's learning rate: the client learning rate (SplitLr in SGLR scales it)."""
        return self.config.client_lr

    def participants(self, round_index: int, clients: Sequence[str]) -> list[str]:
        """Which of ``clients`` talk to the server in this iteration of round ``round_index`` (all by default)."""
        return list(clients)

    # -- the server step -------------------------------------------------------------------

    def train_round(self, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, ServerReply]:
        """Single split: one iteration on ``client -> (activation, labels)``; B is the last segment."""
        self._check_clients(batch)
        server = self._require_server()
        names = list(batch)
        sizes = [int(batch[c][0].shape[0]) for c in names]
        # mean over the concatenation == sum_i delta_i * L_i with delta_i = n_i / sum(n)
        _, grad, out = server.train_with_labels(
            torch.cat([batch[c][0] for c in names]), torch.cat([batch[c][1] for c in names])
        )
        grads = self._local_grads(names, sizes, grad)
        out_parts = out.split(sizes)
        losses = [float(label_loss(o, batch[c][1], server.loss_kind)) for o, c in zip(out_parts, names, strict=True)]
        out_parts = out.detach().split(sizes)
        return {
            c: ServerReply(grads[c] if self.sends_gradient else None, losses[i], out_parts[i])
            for i, c in enumerate(names)
        }

    def forward_round(self, activations: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Double split: B's train-mode outputs for each client (the graph is kept for ``backward_round``)."""
        self._check_clients(activations)
        server = self._require_server()
        names = list(activations)
        sizes = [int(activations[c].shape[0]) for c in names]
        out = server.forward(torch.cat([activations[c] for c in names]))
        self._pending_round = (names, sizes)
        return dict(zip(names, out.split(sizes), strict=True))

    def backward_round(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Double split: B's aux-loss step from ``dL_i/d(B output)``; returns ``dL/d(B input)`` per client."""
        server = self._require_server()
        pending = self._pending_round
        if pending is None:
            raise RuntimeError("backward_round called without a preceding forward_round")
        names, sizes = pending
        if set(grads) != set(names):
            raise ValueError(f"gradients for {sorted(grads)} but the forward step had {sorted(names)}")
        self._pending_round = None
        total = sum(sizes)
        g = torch.cat([grads[c] * (n / total) for c, n in zip(names, sizes, strict=True)])
        grad = server.train_with_gradient(g)
        return self._local_grads(names, sizes, grad)

    def _local_grads(self, names: list[str], sizes: list[int], grad: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Split B's input gradient of ``sum_i delta_i L_i`` into each client's local ``dL_i/d(a_i)``."""
        if grad is None:
            raise RuntimeError("the server segment returned no input gradient (built with input_grad=False?)")
        total = sum(sizes)
        local = {c: part * (total / n) for c, n, part in zip(names, sizes, grad.split(sizes), strict=True)}
        self.last_broadcast = frozenset()
        return self.combine_gradients(local)

    def combine_gradients(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook on the cut-layer gradients before they are sent (SplitAvg); identity by default."""
        return local

    @torch.no_grad()
    def evaluate(self, client: str, x: torch.Tensor) -> torch.Tensor:
        """B's inference-mode output for ``client``'s activations (per-client masks in AdaSplit)."""
        return self._require_server().evaluate(x)

    # -- rounds and feedback ---------------------------------------------------------------

    def end_round(
        self, device_states: Mapping[str, Mapping[str, torch.Tensor]], num_samples: Mapping[str, int]
    ) -> dict[str, DeviceState]:
        """Close a round: the device weights each listed client must load.

        ``device_sync == "average"`` (SplitFed, FedAvg): every client gets the sample-weighted mean; otherwise none.
        """
        self.round += 1
        if not self.averages_device_states() or not device_states:
            return {}
        if self.reducer is not None:
            avg = self.reducer.average_states(device_states, num_samples)
        else:
            avg = average_states(device_states, num_samples)
        return {c: {k: v.clone() for k, v in avg.items()} for c in device_states}

    @classmethod
    def averages_device_states(cls) -> bool:
        """The round-end rule: whether clients upload their device weights at a round's end and load the mean."""
        return cls.device_sync == "average"

    def summary(self, clients: Sequence[str]) -> dict[str, float]:
        """Numbers about the server side that a run reports beside its metrics (none by default)."""
        return {}

    def end_turn(self, client: str, device_state: Mapping[str, torch.Tensor]) -> None:
        """``client`` finished its turn and uploaded its device weights (only ``device_sync == "relay"``)."""

    def device_state_for(self, client: str) -> DeviceState | None:
        """Weights ``client`` must load before its turn (SSL: the previous client's); None keeps its own."""
        return None

    def observe(self, client: str, metrics: Mapping[str, float]) -> None:
        """Feedback from a client (e.g. its local loss); unused by default."""

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: B, its optimizer, the round, the sampling RNG, strategy state."""
        state: dict[str, Any] = {"name": self.name, "round": self.round, "generator": self._generator.get_state()}
        if self.server is not None:
            state["server"] = {k: v.detach().clone() for k, v in self.server.module.state_dict().items()}
            state["optimizer"] = self.server.optimizer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint of strategy {state.get('name')!r}, not {self.name!r}")
        self.round = int(state["round"])
        self._generator.set_state(state["generator"])
        if self.server is not None:
            self.server.module.load_state_dict(state["server"])
            self.server.optimizer.load_state_dict(state["optimizer"])

    # -- helpers ---------------------------------------------------------------------------

    def _require_server(self) -> TorchSegment:
        if self.server is None:
            raise RuntimeError(f"strategy {self.name!r} has no server segment")
        return self.server

    def _check_clients(self, per_client: Mapping[str, object]) -> None:
        if not per_client:
            raise ValueError("an iteration needs at least one client")
        if not self.batches_server and len(per_client) != 1:
            raise ValueError(f"strategy {self.name!r} serves one client per call, got {len(per_client)}")


def average_states(
    states: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, int]
) -> DeviceState:
    """Sample-weighted average of device states (FedAvg); integer buffers take the maximum."""
    if not states:
        raise ValueError("nothing to average")
    total = float(sum(weights[c] for c in states))
    first = next(iter(states.values()))
    out: DeviceState = {}
    for key, ref in first.items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for c, s in states.items():
                acc += s[key].double() * (weights[c] / total)
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states.values()]).max(dim=0).values
    return out

