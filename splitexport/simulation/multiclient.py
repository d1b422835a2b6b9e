"""Multi-client split learning of a bundle: N simulated devices around one server strategy.

Each client is a device of the strategy's kind (``Strategy.device``: split, local-loss or full-model
client) with the bundle's optimizer and a partition of the training split. The server side is a
:class:`ServerLink`: in process it is the :class:`~splitexport.strategies.Strategy` itself; an HTTP
client with the same methods runs the same simulation against ``splitexport serve``. Everything that
would cross the network is counted in bytes (float32 activations and gradients, int64 labels,
weights; :mod:`.metrics`), every segment step in FLOPs, and the test accuracy is measured after
every round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from tqdm import tqdm

from .._bundle import Bundle
from .._errors import SplitExportError
from .._manifest import OptimizerSpec
from .._torch_segment import TorchSegment, eager_execution
from .._update_rule import LossKind, label_loss
from ..strategies import (
    STRATEGIES,
    Context,
    Device,
    LossTally,
    SegmentNames,
    ServerLink,
    Strategy,
    StrategyConfig,
    hyperparameter_fields,
)
from .client_data import PartitionKind, partition_indices
from .data import Dataset, batch_indices
from .datafiles import resolve_data
from .metrics import C3_TEMPERATURE, TRAIN_FLOPS_FACTOR, Ledger, Usage, c3_score, forward_flops

__all__ = ["C3_TEMPERATURE", "MultiClientResult", "RoundMetrics", "ServerLink", "Usage", "c3_score",
           "segment_flops", "simulate_clients", "write_results"]


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
    link: ServerLink | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **hyperparameters: Any,
) -> MultiClientResult:
    """Train ``bundle`` with ``clients`` simulated devices under ``strategy`` for ``rounds`` rounds.

    A round is one pass of every client over its partition in mini-batches of
    ``batch_size`` (iteration t holds the clients that still have a t-th batch).
    ``link`` replaces the in-process server (it must run the same strategy).
    ``hyperparameters`` are the strategies' (``alpha=0.5``, ``kappa=0.3``; see
    :func:`~splitexport.strategies.hyperparameter_fields`), unset ones at their defaults.
    """
    cls = _strategy_for(bundle, strategy, rounds, batch_size)
    manifest = bundle.manifest
    opt = optimizer or manifest.optimizer
    data = resolve_data(dataset, manifest)
    fields = hyperparameter_fields()
    unknown = sorted(set(hyperparameters) - set(fields))
    if unknown:
        raise SplitExportError(f"unknown hyperparameter {', '.join(unknown)}; the strategies have {', '.join(fields)}")
    params = {name: hyperparameters.get(name, h.field.default) for name, h in fields.items()}
    try:
        cls.Params.model_validate(params)
    except ValidationError as exc:
        raise SplitExportError(f"strategy {strategy!r}: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc
    config = StrategyConfig(num_clients=clients, client_lr=opt.lr, total_rounds=rounds, seed=seed, **params)
    torch.manual_seed(seed)
    names = SegmentNames(tuple(s.name for s in manifest.segments), manifest.server_segments[0].name,
                         tuple(s.name for s in manifest.segments if s.role == "device"))
    if link is None:
        server = None
        if cls.needs_server:
            server = TorchSegment(bundle.torch_segment(names.server), opt, loss=manifest.loss.kind,
                                  input_grad=cls.sends_gradient)
        link = cls(server, config)
    flops = segment_flops(bundle, data.x_train[:1])
    devices = _make_devices(bundle, cls, names, opt, partition_indices(data.y_train, clients, partition, seed=seed),
                            flops, seed)
    result = MultiClientResult(strategy, clients, partition, manifest.split, {
        "batch_size": batch_size, "seed": seed, "rounds": rounds, "optimizer": opt.model_dump(mode="json"),
        **params, "dataset": data.name, "segment_flops": flops,
    })
    ledger = Ledger({d.name: Usage() for d in devices})

    def batches(d: Device, r: int) -> list[torch.Tensor]:
        return [d.index[b] for b in batch_indices(len(d.index), batch_size, seed=seed * 7919 + d.number, epoch=r)]

    bar = tqdm(total=rounds * sum(len(batches(d, 0)) for d in devices), desc=f"{strategy} C={clients} {partition}",
               unit="batch", disable=not progress, leave=False, mininterval=0.5)
    try:
        for r in range(rounds):
            ctx = Context(cls, link, ledger, LossTally(), r, bar.update)
            _train_round(devices, {d.name: batches(d, r) for d in devices}, data, ctx)
            _end_round(devices, ctx)
            acc, local_acc, test_loss = _evaluate(devices, link, data, manifest.loss.kind)
            result.rounds.append(RoundMetrics(
                round=r + 1, train_loss=ctx.tally.mean, test_loss=test_loss, test_accuracy=acc,
                local_accuracy=local_acc, bytes=ledger.bytes, device_flops=ledger.total.device_flops,
                server_flops=ledger.total.server_flops,
            ))
            if log is not None:
                log(f"{strategy:>8} C={clients:<3} {partition:<6} round {r + 1:>3}: test acc {acc:.4f}  "
                    f"MB {result.rounds[-1].bytes / 1e6:.2f}")
    finally:
        bar.close()
    result.per_client = ledger.per_client
    result.server_bytes_down = ledger.server_down
    if isinstance(link, Strategy):
        result.config.update(link.summary([d.name for d in devices]))
    return result


def _strategy_for(bundle: Bundle, strategy: str, rounds: int, batch_size: int) -> type[Strategy]:
    """The strategy class, after checking that it fits the bundle and the run (one clear line if not)."""
    if strategy not in STRATEGIES:
        raise SplitExportError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if rounds < 1 or batch_size < 1:
        raise SplitExportError("--rounds and --batch-size must be at least 1")
    manifest = bundle.manifest
    cls = STRATEGIES[strategy]
    if manifest.split not in cls.splits:
        raise SplitExportError(f"strategy {strategy!r} supports the {' and '.join(sorted(cls.splits))} split, "
                               f"but the bundle is a {manifest.split} split")
    loss_kind = manifest.loss.kind
    if loss_kind != "cross_entropy":  # rounds are scored by accuracy (and C3-Score), label shards need classes
        raise SplitExportError(f"multi-client simulation needs a classifier bundle (loss cross_entropy); this one "
                               f"is {loss_kind}: use simulate without --clients/--strategy")
    if manifest.defence.active:
        raise SplitExportError("multi-client simulation does not apply the bundle's defence (--nopeek/--activation-noise) "
                               "yet; simulate it with one device: splitexport simulate without --clients/--strategy")
    return cls


def segment_flops(bundle: Bundle, sample: torch.Tensor) -> dict[str, int]:
    """Forward FLOPs per sample of each segment, in order, on ``sample`` (one input)."""
    flops: dict[str, int] = {}
    x = sample
    for spec in bundle.manifest.segments:
        m = bundle.torch_segment(spec.name)
        flops[spec.name] = forward_flops(m, x)
        with torch.no_grad(), eager_execution():
            m.eval()
            x = m(x)
    return flops


def _make_devices(bundle: Bundle, cls: type[Strategy], names: SegmentNames, optimizer: OptimizerSpec,
                  parts: Sequence[torch.Tensor], flops: Mapping[str, int], seed: int) -> list[Device]:
    """One device of the strategy's kind per partition; devices that share weights start from the same ones."""
    cut_features = int(math.prod(bundle.manifest.segments[0].output.sample_shape))
    devices: list[Device] = []
    for i, index in enumerate(parts):
        torch.manual_seed(seed * 1_000 + i)
        mods = {n: bundle.torch_segment(n) for n in cls.device.segments(names)}
        extra = cls.device.extra_modules(cut_features)
        mods.update(extra)
        per_sample = {**flops, **{n: forward_flops(m, torch.zeros(1, cut_features)) for n, m in extra.items()}}
        train = {n: TRAIN_FLOPS_FACTOR * f for n, f in per_sample.items()}
        devices.append(cls.device(i, mods, names, optimizer, bundle.manifest.loss.kind, index, train))
    if cls.device_sync in ("average", "relay"):  # shared device weights start identical (as a server would ship)
        for d in devices[1:]:
            d.load(devices[0].state())
    return devices


def _train_round(devices: list[Device], plan: Mapping[str, list[torch.Tensor]], data: Dataset, ctx: Context) -> None:
    """Every device's pass over its batches: in turns (SSL), or in lock-step iterations."""
    device = ctx.strategy.device
    if device.takes_turns(ctx.strategy):
        for d in devices:
            d.turn([(data.x_train[idx], data.y_train[idx]) for idx in plan[d.name]], ctx)
        return
    for t in range(max(len(p) for p in plan.values())):
        present = [d for d in devices if t < len(plan[d.name])]
        xs = {d.name: data.x_train[plan[d.name][t]] for d in present}
        ys = {d.name: data.y_train[plan[d.name][t]] for d in present}
        device.iteration(present, xs, ys, ctx)
        ctx.advance(len(present))


def _end_round(devices: list[Device], ctx: Context) -> None:
    """Close the round; where the strategy averages device weights, upload them and load the mean."""
    if not ctx.strategy.averages_device_states():
        ctx.link.end_round({}, {})
        return
    by_name = {d.name: d for d in devices}
    states = {d.name: d.state() for d in devices}
    for d in devices:
        ctx.meter.count(d.name, up=states[d.name].values())
    new = ctx.link.end_round(states, {d.name: len(d.index) for d in devices})
    for c, st in new.items():
        by_name[c].load(st)
        ctx.meter.count(c, down=st.values())
    if new:
        ctx.meter.server_sent(*next(iter(new.values())).values())  # one broadcast of the mean


@torch.no_grad()
def _evaluate(devices: list[Device], link: ServerLink, data: Dataset, loss_kind: LossKind) -> tuple[float, float, float]:
    """Mean test accuracy (all, own classes) and loss over the clients' models (SSL: the relayed weights)."""
    accs, local, losses = [], [], []
    for d in devices:
        logits = d.predict(data.x_test, link)
        hits = (logits.argmax(1) == data.y_test).float()
        own = torch.isin(data.y_test, data.y_train[d.index].unique())
        accs.append(float(hits.mean()))
        local.append(float(hits[own].mean()))
        losses.append(float(label_loss(logits, data.y_test, loss_kind)))
    return sum(accs) / len(accs), sum(local) / len(local), sum(losses) / len(losses)


def write_results(results: Sequence[MultiClientResult], out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """``metrics.json`` and ``clients.png`` (accuracy vs rounds and vs bandwidth) for a set of runs."""
    from .plots import plot_multiclient

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
