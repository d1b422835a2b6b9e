"""The device half of a strategy: what each simulated device runs, declared by the strategy's ``device``.

* :class:`SplitClient`: the device segments (A, or A and C) train on the gradients the server returns
  (SSL, PSL, SplitFed, SGLR);
* :class:`LocalLossClient`: A trains on a local loss through a projection head and only uploads
  activations (AdaSplit);
* :class:`FullModelClient`: the whole model trains on the device, the server only averages (FedAvg).

A device procedure talks to the server through a :class:`ServerLink` (the strategy itself in process, an
HTTP client against ``splitexport serve``) and reports every tensor that crosses the network, and every
FLOP, to a :class:`Meter`. The simulation harness owns the data, the rounds and the accounting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

from .._manifest import OptimizerSpec
from .._torch_segment import TorchSegment, eager_execution
from .._update_rule import LossKind, label_loss
from ..protocol import DeviceState, ServerReply
from ._ntxent import projection_head, supervised_nt_xent

if TYPE_CHECKING:
    from ._base import Strategy


class ServerLink(Protocol):
    """The server as the simulated devices see it: a Strategy in process, an HTTP client for ``serve``.

    The strategy's class attributes (``device_sync``, ``batches_server``, ...) come from
    ``STRATEGIES[name]``; a link only needs the methods and ``last_broadcast``.
    """

    last_broadcast: frozenset[str]

    def participants(self, round_index: int, clients: Sequence[str]) -> list[str]: ...

    def train_round(self, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, ServerReply]: ...

    def forward_round(self, activations: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def backward_round(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def end_round(
        self, device_states: Mapping[str, Mapping[str, torch.Tensor]], num_samples: Mapping[str, int]
    ) -> dict[str, DeviceState]: ...

    def end_turn(self, client: str, device_state: Mapping[str, torch.Tensor]) -> None: ...

    def device_state_for(self, client: str) -> DeviceState | None: ...

    def observe(self, client: str, metrics: Mapping[str, float]) -> None: ...

    def evaluate(self, client: str, x: torch.Tensor) -> torch.Tensor: ...


class Meter(Protocol):
    """Where a device procedure reports traffic and compute (the harness's ledger)."""

    def count(self, client: str, *, up: Iterable[torch.Tensor] = (), down: Iterable[torch.Tensor] = (),
              device_flops: int = 0, server_flops: int = 0) -> None: ...

    def server_sent(self, *tensors: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class SegmentNames:
    """The bundle's segments in order, B's name, and the device's (A, or A and C)."""

    all: tuple[str, ...]
    server: str
    device: tuple[str, ...]

    @property
    def a(self) -> str:
        return self.device[0]

    @property
    def c(self) -> str | None:
        return self.device[1] if len(self.device) > 1 else None


@dataclass
class LossTally:
    """The round's sample-weighted training loss."""

    loss_sum: float = 0.0
    seen: int = 0

    def add(self, loss: float, n: int) -> None:
        self.loss_sum += loss * n
        self.seen += n

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.seen, 1)


@dataclass
class Context:
    """What a device procedure needs during a round besides its devices."""

    strategy: type[Strategy]
    link: ServerLink
    meter: Meter
    tally: LossTally
    round: int
    advance: Callable[[int], None] = lambda n: None
    """Progress: called with the number of batches each step consumed."""


Batch = Mapping[str, torch.Tensor]
"""One tensor per device name (the iteration's inputs, or its labels)."""


class Device(ABC):
    """One simulated device: its modules, optimizer state, data indices, and per-sample training FLOPs.

    ``train_flops`` holds each module's training FLOPs per sample (forward + backward).
    """

    private: ClassVar[frozenset[str]] = frozenset()
    """Modules that never leave the device (left out of :meth:`state`)."""

    def __init__(self, number: int, modules: dict[str, nn.Module], names: SegmentNames, optimizer: OptimizerSpec,
                 loss: LossKind, index: torch.Tensor, train_flops: Mapping[str, int]) -> None:
        self.number = number
        self.name = f"client{number:02d}"
        self.modules = modules
        self.names = names
        self.loss_kind = loss
        self.index = index
        self.train_flops = dict(train_flops)

    # -- what a device holds ------------------------------------------------------------------

    @classmethod
    def segments(cls, names: SegmentNames) -> tuple[str, ...]:
        """The bundle segments a device of this kind holds."""
        return names.device

    @classmethod
    def extra_modules(cls, cut_features: int) -> dict[str, nn.Module]:
        """Modules that exist only on the device (never uploaded), by name."""
        return {}

    def state(self) -> DeviceState:
        """The weights the device shares (all but device-only modules)."""
        return {f"{seg}.{k}": v.detach().clone() for seg, m in self.modules.items() if seg not in self.private
                for k, v in m.state_dict().items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        for seg, m in self.modules.items():
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == seg}
            if sub:
                m.load_state_dict(sub)

    # -- a round ------------------------------------------------------------------------------

    @classmethod
    def takes_turns(cls, strategy: type[Strategy]) -> bool:
        """True: clients train one after another over all their batches (:meth:`turn`); else in lock-step."""
        return False

    @classmethod
    @abstractmethod
    def iteration(cls, present: Sequence[Device], xs: Batch, ys: Batch, ctx: Context) -> None:
        """One lock-step iteration over the devices that still have a batch this round."""

    def turn(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], ctx: Context) -> None:
        """This device's turn over all its batches (only where :meth:`takes_turns`)."""
        raise NotImplementedError(f"{type(self).__name__} does not take turns")

    @abstractmethod
    def predict(self, x: torch.Tensor, link: ServerLink) -> torch.Tensor:
        """The device's model (with the server's part for it) on ``x``, in inference mode."""


def _eval(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = module.training
    module.eval()
    with eager_execution():
        out = module(x)
    module.train(was)
    return out


class SplitClient(Device):
    """A, or A and C, trained on the gradients the server returns (the split-learning device)."""

    def __init__(self, number: int, modules: dict[str, nn.Module], names: SegmentNames, optimizer: OptimizerSpec,
                 loss: LossKind, index: torch.Tensor, train_flops: Mapping[str, int]) -> None:
        super().__init__(number, modules, names, optimizer, loss, index, train_flops)
        self.a = TorchSegment(modules[names.a], optimizer, loss=loss, input_grad=False)
        self.c = TorchSegment(modules[names.c], optimizer, loss=loss) if names.c is not None else None

    @classmethod
    def takes_turns(cls, strategy: type[Strategy]) -> bool:
        # SSL relays the weights; any split strategy whose server serves one client per call goes in turns
        return strategy.device_sync == "relay" or not strategy.batches_server

    @classmethod
    def iteration(cls, present: Sequence[Device], xs: Batch, ys: Batch, ctx: Context) -> None:
        chosen = set(ctx.link.participants(ctx.round, [d.name for d in present]))
        cls._server_step([d for d in present if d.name in chosen and isinstance(d, SplitClient)], xs, ys, ctx)

    def turn(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], ctx: Context) -> None:
        incoming = ctx.link.device_state_for(self.name)
        if incoming is not None:
            self.load(incoming)
            ctx.meter.count(self.name, down=incoming.values())
            ctx.meter.server_sent(*incoming.values())
        for x, y in batches:
            self._server_step([self], {self.name: x}, {self.name: y}, ctx)
            ctx.advance(1)
        if ctx.strategy.device_sync == "relay":
            st = self.state()
            ctx.link.end_turn(self.name, st)
            ctx.meter.count(self.name, up=st.values())

    @classmethod
    def _server_step(cls, members: list[SplitClient], xs: Batch, ys: Batch, ctx: Context) -> None:
        """One server iteration for ``members`` (all at once, or one each for unbatched strategies)."""
        link, meter = ctx.link, ctx.meter
        acts = {d.name: d.a.forward(xs[d.name]) for d in members}
        if not members:
            grads_sent: dict[str, torch.Tensor] = {}
        elif members[0].names.c is None:
            grads_sent = cls._single_split(members, acts, ys, ctx)
        else:
            grads_sent = cls._double_split(members, acts, ys, ctx)
        shared = link.last_broadcast
        for c, g in grads_sent.items():
            meter.count(c, down=[g])
        meter.server_sent(*(g for c, g in grads_sent.items() if c not in shared))
        if shared:
            meter.server_sent(grads_sent[next(iter(shared))])

    @staticmethod
    def _single_split(members: list[SplitClient], acts: dict[str, torch.Tensor], ys: Batch,
                      ctx: Context) -> dict[str, torch.Tensor]:
        replies = ctx.link.train_round({c: (acts[c], ys[c]) for c in acts})
        for d in members:
            rep, n = replies[d.name], len(ys[d.name])
            ctx.meter.count(d.name, up=[acts[d.name], ys[d.name]], device_flops=d.train_flops[d.names.a] * n,
                            server_flops=d.train_flops[d.names.server] * n)
            if rep.grad is not None:
                d.a.train_with_gradient(rep.grad)
            ctx.tally.add(rep.loss or 0.0, n)
        return {d.name: g for d in members if (g := replies[d.name].grad) is not None}

    @staticmethod
    def _double_split(members: list[SplitClient], acts: dict[str, torch.Tensor], ys: Batch,
                      ctx: Context) -> dict[str, torch.Tensor]:
        outs = ctx.link.forward_round(acts)
        g_out = {}
        for d in members:
            assert d.c is not None and d.names.c is not None
            n = len(ys[d.name])
            lval, g, _ = d.c.train_with_labels(outs[d.name], ys[d.name])
            assert g is not None
            g_out[d.name] = g
            ctx.meter.count(d.name, up=[acts[d.name], g], down=[outs[d.name]],
                            device_flops=(d.train_flops[d.names.a] + d.train_flops[d.names.c]) * n,
                            server_flops=d.train_flops[d.names.server] * n)
            ctx.meter.server_sent(outs[d.name])
            ctx.tally.add(lval, n)
        back = ctx.link.backward_round(g_out)
        for d in members:
            d.a.train_with_gradient(back[d.name])
        return dict(back)

    def predict(self, x: torch.Tensor, link: ServerLink) -> torch.Tensor:
        incoming = link.device_state_for(self.name)  # SSL: evaluate the relayed weights
        saved = None
        if incoming is not None:
            saved = self.state()
            self.load(incoming)
        out = link.evaluate(self.name, _eval(self.modules[self.names.a], x))
        if self.names.c is not None:
            out = _eval(self.modules[self.names.c], out)
            self.modules[self.names.c].train()
        if saved is not None:
            self.load(saved)
        return out


class LocalLossClient(Device):
    """A trained on a supervised NT-Xent loss through a device-only projection head ``H`` (AdaSplit).

    The device never receives a server gradient; the server's participants get the cut activations
    and labels so that B trains on them.
    """

    HEAD = "H"
    private = frozenset({HEAD})

    def __init__(self, number: int, modules: dict[str, nn.Module], names: SegmentNames, optimizer: OptimizerSpec,
                 loss: LossKind, index: torch.Tensor, train_flops: Mapping[str, int]) -> None:
        super().__init__(number, modules, names, optimizer, loss, index, train_flops)
        self.optimizer = optimizer.build([p for m in modules.values() for p in m.parameters()])

    @classmethod
    def extra_modules(cls, cut_features: int) -> dict[str, nn.Module]:
        return {cls.HEAD: projection_head(cut_features)}

    @classmethod
    def iteration(cls, present: Sequence[Device], xs: Batch, ys: Batch, ctx: Context) -> None:
        acts = {d.name: d.local_step(xs[d.name], ys[d.name], ctx) for d in present if isinstance(d, LocalLossClient)}
        by_name = {d.name: d for d in present}
        for c in ctx.link.participants(ctx.round, [d.name for d in present]):
            d = by_name[c]
            rep = ctx.link.train_round({c: (acts[c], ys[c])})[c]
            ctx.meter.count(c, up=[acts[c], ys[c]], server_flops=d.train_flops[d.names.server] * len(ys[c]))
            ctx.tally.add(rep.loss or 0.0, len(ys[c]))

    def local_step(self, x: torch.Tensor, y: torch.Tensor, ctx: Context) -> torch.Tensor:
        """A step of A and H on the local NT-Xent loss; returns the cut activation."""
        a, h = self.modules[self.names.a], self.modules[self.HEAD]
        a.train()
        with eager_execution():
            act = a(x)
            loss = supervised_nt_xent(h(act), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        ctx.meter.count(self.name, device_flops=(self.train_flops[self.names.a] + self.train_flops[self.HEAD]) * len(y))
        ctx.link.observe(self.name, {"local_loss": float(loss.detach())})
        return act.detach()

    def predict(self, x: torch.Tensor, link: ServerLink) -> torch.Tensor:
        return link.evaluate(self.name, _eval(self.modules[self.names.a], x))


class FullModelClient(Device):
    """Every segment on the device with one optimizer; the server only averages (FedAvg)."""

    def __init__(self, number: int, modules: dict[str, nn.Module], names: SegmentNames, optimizer: OptimizerSpec,
                 loss: LossKind, index: torch.Tensor, train_flops: Mapping[str, int]) -> None:
        super().__init__(number, modules, names, optimizer, loss, index, train_flops)
        self.full = nn.Sequential(*modules.values())
        self.optimizer = optimizer.build(self.full.parameters())

    @classmethod
    def segments(cls, names: SegmentNames) -> tuple[str, ...]:
        return names.all

    @classmethod
    def iteration(cls, present: Sequence[Device], xs: Batch, ys: Batch, ctx: Context) -> None:
        for d in present:
            assert isinstance(d, FullModelClient)
            d.step(xs[d.name], ys[d.name], ctx)

    def step(self, x: torch.Tensor, y: torch.Tensor, ctx: Context) -> None:
        self.full.train()
        with eager_execution():
            loss = label_loss(self.full(x), y, self.loss_kind)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        ctx.meter.count(self.name, device_flops=sum(self.train_flops[n] for n in self.names.all) * len(y))
        ctx.tally.add(float(loss.detach()), len(y))

    def predict(self, x: torch.Tensor, link: ServerLink) -> torch.Tensor:
        self.full.eval()
        with eager_execution():
            out = self.full(x)
        self.full.train()
        return out
