"""Multi-client split learning of a bundle: N simulated devices around one server strategy.

Each client holds its own copy of the device segments (A, or A and C) with the
bundle's optimizer and a partition of the training split. The server side is a
:class:`ServerLink`: in process it is the :class:`~splitexport.strategies.Strategy`
itself; an HTTP client with the same methods runs the same simulation against
``splitexport serve``. Everything that would cross the network is counted in bytes
(float32 activations and gradients, int64 labels, weights), every segment step in
FLOPs, and the test accuracy is measured after every round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ._bundle import Bundle
from ._data import Dataset, batch_indices
from ._datafiles import resolve_data
from ._errors import SplitExportError
from ._manifest import OptimizerSpec
from ._partitions import PartitionKind, partition_indices
from ._torch_segment import TorchSegment, eager_execution
from ._update_rule import LossKind, label_loss
from .protocol import DeviceState, ServerReply
from .strategies import STRATEGIES, AdaSplit, StrategyConfig, projection_head, supervised_nt_xent

C3_TEMPERATURE = 8.0
"""AdaSplit's C3-Score leaves the temperature T unstated; T = 8 reproduces its Tables 1-2 to +-0.01."""


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


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` on the wire: float tensors as float32, others at their own width."""
    return t.numel() * (4 if t.is_floating_point() else t.element_size())


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(tensor_bytes(t) for t in state.values())


def forward_flops(module: nn.Module, sample: torch.Tensor) -> int:
    """Forward FLOPs of ``module`` per sample (counted on a batch of 2 in eval mode, no state change)."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, eager_execution():
            module(sample.expand(2, *sample.shape[1:]).contiguous())
    finally:
        module.train(was)
    return counter.get_total_flops() // 2


TRAIN_FLOPS_FACTOR = 3
"""Training FLOPs per sample ~ 3x forward (forward + backward for inputs and weights)."""


@dataclass
class Usage:
    """What one client (or the whole run) consumed."""

    bytes_up: int = 0
    bytes_down: int = 0
    device_flops: int = 0
    server_flops: int = 0

    def add(self, other: Usage) -> None:
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.device_flops += other.device_flops
        self.server_flops += other.server_flops


@dataclass
class RoundMetrics:
    round: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    """Mean over clients of each client's model (its device segments with the server's B for it)."""
    local_accuracy: float
    """The same on the test samples of the classes each client holds (its own distribution; = test accuracy IID)."""
    bytes: int
    """Cumulative bytes over the network (uplink + downlink; a broadcast counts once)."""
    device_flops: int
    server_flops: int


@dataclass
class MultiClientResult:
    strategy: str
    clients: int
    partition: str
    split: str
    config: dict[str, Any]
    rounds: list[RoundMetrics] = field(default_factory=list)
    per_client: dict[str, Usage] = field(default_factory=dict)
    server_bytes_down: int = 0
    """Bytes the server sent (a SplitAvg broadcast once), as opposed to the sum the clients received."""
    label: str = ""
    """How plots and tables name the run (default: the strategy)."""

    def __post_init__(self) -> None:
        self.label = self.label or self.strategy

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].test_accuracy if self.rounds else float("nan")

    @property
    def final_local_accuracy(self) -> float:
        return self.rounds[-1].local_accuracy if self.rounds else float("nan")

    @property
    def total_bytes(self) -> int:
        return self.rounds[-1].bytes if self.rounds else 0

    @property
    def device_flops(self) -> int:
        return sum(u.device_flops for u in self.per_client.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "label": self.label, "clients": self.clients, "partition": self.partition, "split": self.split,
            "config": self.config, "final_accuracy": self.final_accuracy,
            "final_local_accuracy": self.final_local_accuracy, "total_bytes": self.total_bytes,
            "device_flops": self.device_flops, "server_bytes_down": self.server_bytes_down,
            "rounds": [asdict(r) for r in self.rounds],
            "per_client": {c: asdict(u) for c, u in self.per_client.items()},
        }


def c3_score(accuracy: float, bandwidth: float, compute: float, max_bandwidth: float, max_compute: float,
             temperature: float = C3_TEMPERATURE) -> float:
    """AdaSplit's C3-Score: ``(A / 100%) * exp(-(B / B_max + C / C_max) / T)`` (accuracy as a fraction)."""
    b = bandwidth / max_bandwidth if max_bandwidth > 0 else 0.0
    c = compute / max_compute if max_compute > 0 else 0.0
    return accuracy * math.exp(-(b + c) / temperature)


class _Client:
    """One simulated device: its segments, optimizer state, data and usage."""

    def __init__(self, number: int, modules: dict[str, nn.Module], device_segments: Sequence[str],
                 optimizer: OptimizerSpec, loss: LossKind, index: torch.Tensor, mode: str, flops: dict[str, int]) -> None:
        self.number = number
        self.name = f"client{number:02d}"
        self.modules = modules
        self.index = index
        self.usage = Usage()
        self.flops = flops
        self.loss_kind = loss
        if mode == "full":  # FedAvg: the whole model, one optimizer
            self.full = nn.Sequential(*modules.values())
            self.full_opt = optimizer.build(self.full.parameters())
        elif mode == "local":  # AdaSplit: A + projection head on a local loss
            self.local_opt = optimizer.build([p for m in modules.values() for p in m.parameters()])
        else:
            self.a = TorchSegment(modules[device_segments[0]], optimizer, loss=loss, input_grad=False)
            self.c = TorchSegment(modules[device_segments[1]], optimizer, loss=loss) if len(device_segments) > 1 else None

    def state(self) -> DeviceState:
        return {f"{seg}.{k}": v.detach().clone() for seg, m in self.modules.items() if seg != "H"
                for k, v in m.state_dict().items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        for seg, m in self.modules.items():
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == seg}
            if sub:
                m.load_state_dict(sub)


@dataclass
class _Round:
    loss_sum: float = 0.0
    seen: int = 0


def simulate_clients(
    bundle: Bundle,
    *,
    strategy: str,
    clients: int,
    partition: PartitionKind = "iid",
    rounds: int = 10,
    batch_size: int = 16,
    seed: int = 0,
    optimizer: OptimizerSpec | None = None,
    dataset: str | Dataset = "digits",
    alpha: float = 0.0,
    phi: float = 0.0,
    phase_rounds: int | None = None,
    kappa: float = 0.5,
    eta: float = 0.5,
    lam: float = 1e-4,
    link: ServerLink | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> MultiClientResult:
    """Train ``bundle`` with ``clients`` simulated devices under ``strategy`` for ``rounds`` rounds.

    A round is one pass of every client over its partition in mini-batches of
    ``batch_size`` (iteration t holds the clients that still have a t-th batch).
    ``link`` replaces the in-process server (it must run the same strategy).
    """
    if strategy not in STRATEGIES:
        raise SplitExportError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if rounds < 1 or batch_size < 1:
        raise SplitExportError("--rounds and --batch-size must be at least 1")
    manifest = bundle.manifest
    split = manifest.split
    cls = STRATEGIES[strategy]
    if split not in cls.splits:
        raise SplitExportError(f"strategy {strategy!r} supports the {' and '.join(sorted(cls.splits))} split, "
                               f"but the bundle is a {split} split")
    opt = optimizer or manifest.optimizer
    loss_kind = manifest.loss.kind
    if loss_kind != "cross_entropy":  # rounds are scored by accuracy (and C3-Score), label shards need classes
        raise SplitExportError(f"multi-client simulation needs a classifier bundle (loss cross_entropy); this one "
                               f"is {loss_kind}: use simulate without --clients/--strategy")
    if manifest.defence.active:
        raise SplitExportError("multi-client simulation does not apply the bundle's defence (--nopeek/--activation-noise) "
                               "yet; simulate it with one device: splitexport simulate without --clients/--strategy")
    data = resolve_data(dataset, manifest)
    config = StrategyConfig(num_clients=clients, client_lr=opt.lr, alpha=alpha, phi=phi, phase_rounds=phase_rounds,
                            kappa=kappa, eta=eta, lam=lam, total_rounds=rounds, seed=seed)
    torch.manual_seed(seed)
    seg_names = [s.name for s in manifest.segments]
    server_name = manifest.server_segments[0].name
    dev_segs = [n for n in seg_names if manifest.segment(n).role == "device"]
    a_name, c_name = dev_segs[0], (dev_segs[1] if len(dev_segs) > 1 else None)
    if link is None:
        server = None
        if cls.needs_server:
            server = TorchSegment(bundle.torch_segment(server_name), opt, loss=loss_kind,
                                  input_grad=cls.sends_gradient)
        link = cls(server, config)
    srv: ServerLink = link
    mode = "full" if not cls.needs_server else "local" if not cls.sends_gradient else "split"

    # per-sample forward FLOPs of each segment
    sample = data.x_train[:1]
    flops: dict[str, int] = {}
    x = sample
    for name in seg_names:
        m = bundle.torch_segment(name)
        flops[name] = forward_flops(m, x)
        with torch.no_grad(), eager_execution():
            m.eval()
            x = m(x)
    cut_features = int(math.prod(manifest.segments[0].output.sample_shape))

    parts = partition_indices(data.y_train, clients, partition, seed=seed)
    devices: list[_Client] = []
    for i in range(clients):
        torch.manual_seed(seed * 1_000 + i)
        if mode == "full":
            mods = {n: bundle.torch_segment(n) for n in seg_names}
        else:
            mods = {n: bundle.torch_segment(n) for n in dev_segs}
            if mode == "local":
                mods["H"] = projection_head(cut_features)
        client_flops = dict(flops)
        if mode == "local":
            client_flops["H"] = forward_flops(mods["H"], torch.zeros(1, cut_features))
        devices.append(_Client(i, mods, dev_segs, opt, loss_kind, parts[i], mode, client_flops))
    if cls.device_sync in ("average", "relay"):  # shared device weights start identical (as a server would ship)
        for d in devices[1:]:
            d.load(devices[0].state())
    by_name = {d.name: d for d in devices}
    result = MultiClientResult(strategy, clients, partition, split, {
        "batch_size": batch_size, "seed": seed, "rounds": rounds, "optimizer": opt.model_dump(mode="json"),
        "alpha": alpha, "phi": phi, "phase_rounds": phase_rounds, "kappa": kappa, "eta": eta, "lam": lam,
        "dataset": data.name, "segment_flops": flops,
    })
    total = Usage()
    server_down = 0
    rule = TRAIN_FLOPS_FACTOR

    def batches(d: _Client, r: int) -> list[torch.Tensor]:
        return [d.index[b] for b in batch_indices(len(d.index), batch_size, seed=seed * 7919 + d.number,
                                                  epoch=r)]

    def count(d: _Client, up: int = 0, down: int = 0, dev: int = 0, srv: int = 0) -> None:
        u = Usage(up, down, dev, srv)
        d.usage.add(u)
        total.add(u)

    def split_step(members: list[_Client], xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor],
                   stats: _Round) -> None:
        """One server iteration for ``members`` (all at once, or one each for unbatched strategies)."""
        nonlocal server_down
        acts = {d.name: d.a.forward(xs[d.name]) for d in members}
        n = {d.name: len(ys[d.name]) for d in members}
        if c_name is None:
            replies = srv.train_round({c: (acts[c], ys[c]) for c in acts})
            for d in members:
                rep = replies[d.name]
                count(d, up=tensor_bytes(acts[d.name]) + tensor_bytes(ys[d.name]),
                      dev=rule * flops[a_name] * n[d.name], srv=rule * flops[server_name] * n[d.name])
                if rep.grad is not None:
                    d.a.train_with_gradient(rep.grad)
                stats.loss_sum += (rep.loss or 0.0) * n[d.name]
                stats.seen += n[d.name]
            grads_sent = {d.name: replies[d.name].grad for d in members if replies[d.name].grad is not None}
        else:
            outs = srv.forward_round(acts)
            g_out = {}
            for d in members:
                assert d.c is not None
                lval, g, _ = d.c.train_with_labels(outs[d.name], ys[d.name])
                assert g is not None
                g_out[d.name] = g
                count(d, up=tensor_bytes(acts[d.name]) + tensor_bytes(g), down=tensor_bytes(outs[d.name]),
                      dev=rule * (flops[a_name] + flops[c_name]) * n[d.name], srv=rule * flops[server_name] * n[d.name])
                server_down += tensor_bytes(outs[d.name])
                stats.loss_sum += lval * n[d.name]
                stats.seen += n[d.name]
            back = srv.backward_round(g_out)
            for d in members:
                d.a.train_with_gradient(back[d.name])
            grads_sent = {c: g for c, g in back.items()}
        shared = srv.last_broadcast
        for c, g in grads_sent.items():
            assert g is not None
            count(by_name[c], down=tensor_bytes(g))
        server_down += sum(tensor_bytes(g) for c, g in grads_sent.items() if c not in shared and g is not None)
        if shared:
            first = grads_sent[next(iter(shared))]
            server_down += tensor_bytes(first) if first is not None else 0

    def local_step(d: _Client, x: torch.Tensor, y: torch.Tensor, stats: _Round) -> torch.Tensor:
        """AdaSplit device step on the local NT-Xent loss; returns the cut activation."""
        a, h = d.modules[a_name], d.modules["H"]
        a.train()
        with eager_execution():
            act = a(x)
            loss = supervised_nt_xent(h(act), y)
            d.local_opt.zero_grad(set_to_none=True)
            loss.backward()
        d.local_opt.step()
        count(d, dev=rule * (d.flops[a_name] + d.flops["H"]) * len(y))
        srv.observe(d.name, {"local_loss": float(loss.detach())})
        return act.detach()

    def full_step(d: _Client, x: torch.Tensor, y: torch.Tensor, stats: _Round) -> None:
        d.full.train()
        with eager_execution():
            out = d.full(x)
            loss = label_loss(out, y, loss_kind)
            d.full_opt.zero_grad(set_to_none=True)
            loss.backward()
        d.full_opt.step()
        count(d, dev=rule * sum(flops.values()) * len(y))
        stats.loss_sum += float(loss.detach()) * len(y)
        stats.seen += len(y)

    iters_per_round = sum(len(batches(d, 0)) for d in devices)
    bar = tqdm(total=rounds * iters_per_round, desc=f"{strategy} C={clients} {partition}", unit="batch",
               disable=not progress, leave=False, mininterval=0.5)
    try:
        for r in range(rounds):
            stats = _Round()
            plan = {d.name: batches(d, r) for d in devices}
            if cls.device_sync == "relay" or not cls.batches_server and mode == "split":
                # SSL (and any unbatched split strategy): clients take turns over all their batches
                for d in devices:
                    incoming = srv.device_state_for(d.name)
                    if incoming is not None:
                        d.load(incoming)
                        count(d, down=state_bytes(incoming))
                        server_down += state_bytes(incoming)
                    for idx in plan[d.name]:
                        split_step([d], {d.name: data.x_train[idx]}, {d.name: data.y_train[idx]}, stats)
                        bar.update(1)
                    if cls.device_sync == "relay":
                        st = d.state()
                        srv.end_turn(d.name, st)
                        count(d, up=state_bytes(st))
            else:
                steps = max(len(p) for p in plan.values())
                for t in range(steps):
                    present = [d for d in devices if t < len(plan[d.name])]
                    xs = {d.name: data.x_train[plan[d.name][t]] for d in present}
                    ys = {d.name: data.y_train[plan[d.name][t]] for d in present}
                    if mode == "full":
                        for d in present:
                            full_step(d, xs[d.name], ys[d.name], stats)
                    elif mode == "local":
                        acts = {d.name: local_step(d, xs[d.name], ys[d.name], stats) for d in present}
                        for c in srv.participants(r, [d.name for d in present]):
                            d = by_name[c]
                            rep = srv.train_round({c: (acts[c], ys[c])})[c]
                            count(d, up=tensor_bytes(acts[c]) + tensor_bytes(ys[c]),
                                  srv=rule * flops[server_name] * len(ys[c]))
                            stats.loss_sum += (rep.loss or 0.0) * len(ys[c])
                            stats.seen += len(ys[c])
                    else:
                        chosen = set(srv.participants(r, [d.name for d in present]))
                        split_step([d for d in present if d.name in chosen], xs, ys, stats)
                    bar.update(len(present))
            # close the round: weight averaging where the strategy does it
            if cls.device_sync == "average":
                states = {d.name: d.state() for d in devices}
                for d in devices:
                    count(d, up=state_bytes(states[d.name]))
                new = srv.end_round(states, {d.name: len(d.index) for d in devices})
                for c, st in new.items():
                    by_name[c].load(st)
                    count(by_name[c], down=state_bytes(st))
                if new:
                    server_down += state_bytes(next(iter(new.values())))  # one broadcast of the mean
            else:
                srv.end_round({}, {})
            acc, local_acc, test_loss = _evaluate(devices, srv, data, mode, a_name, c_name, loss_kind)
            result.rounds.append(RoundMetrics(
                round=r + 1, train_loss=stats.loss_sum / max(stats.seen, 1), test_loss=test_loss,
                test_accuracy=acc, local_accuracy=local_acc, bytes=total.bytes_up + server_down, device_flops=total.device_flops,
                server_flops=total.server_flops,
            ))
            if log is not None:
                log(f"{strategy:>8} C={clients:<3} {partition:<6} round {r + 1:>3}: test acc {acc:.4f}  "
                    f"MB {result.rounds[-1].bytes / 1e6:.2f}")
    finally:
        bar.close()
    result.per_client = {d.name: d.usage for d in devices}
    result.server_bytes_down = server_down
    if isinstance(srv, AdaSplit):
        result.config["mask_sparsity"] = sum(srv.masks.sparsity(d.name) for d in devices) / clients
    return result


@torch.no_grad()
def _evaluate(devices: list[_Client], link: ServerLink, data: Dataset, mode: str, a_name: str,
              c_name: str | None, loss_kind: LossKind) -> tuple[float, float, float]:
    """Mean test accuracy (all, own classes) and loss over the clients' models (SSL: the relayed weights)."""
    accs, local, losses = [], [], []
    for d in devices:
        saved = None
        if mode == "split":
            incoming = link.device_state_for(d.name)
            if incoming is not None:
                saved = d.state()
                d.load(incoming)
        if mode == "full":
            d.full.eval()
            with eager_execution():
                logits = d.full(data.x_test)
            d.full.train()
        else:
            a = d.modules[a_name]
            was = a.training
            a.eval()
            with eager_execution():
                act = a(data.x_test)
            a.train(was)
            logits = link.evaluate(d.name, act)
            if c_name is not None:
                c = d.modules[c_name]
                c.eval()
                with eager_execution():
                    logits = c(logits)
                c.train()
        if saved is not None:
            d.load(saved)
        hits = (logits.argmax(1) == data.y_test).float()
        own = torch.isin(data.y_test, data.y_train[d.index].unique())
        accs.append(float(hits.mean()))
        local.append(float(hits[own].mean()))
        losses.append(float(label_loss(logits, data.y_test, loss_kind)))
    return sum(accs) / len(accs), sum(local) / len(local), sum(losses) / len(losses)


def write_results(results: Sequence[MultiClientResult], out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """``metrics.json`` and ``clients.png`` (accuracy vs rounds and vs bandwidth) for a set of runs."""
    from ._plots import plot_multiclient

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_b = max(r.total_bytes for r in results)
    max_c = max(r.device_flops for r in results)
    payload = [{**r.to_dict(), "c3_score": c3_score(r.final_accuracy, r.total_bytes, r.device_flops, max_b, max_c)}
               for r in results]
    metrics = out / "metrics.json"
    metrics.write_text(json.dumps({"runs": payload, "c3_temperature": C3_TEMPERATURE}, indent=2))
    plot = plot_multiclient(results, out / "clients.png", title=title)
    return metrics, plot
