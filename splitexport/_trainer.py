"""In-process split training beside a monolithic run on the same data and seed.

The segments exchange only detached tensors, exactly what would cross the
network: activations forward, ``dL/d(activation)`` backward. Any object with the
:class:`SegmentRunner` methods can stand in for a segment (torch here, ONNX
Runtime for device segments, an HTTP client for the server's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ._manifest import OptimizerSpec
from ._torch_segment import TorchSegment, eager_execution
from ._update_rule import EXACT_RULE, AuxLossRule, LossKind, label_loss

if TYPE_CHECKING:
    from .defence import Defence
    from .simulation.data import Dataset


class SegmentRunner(Protocol):
    """What the split trainer needs from one segment, wherever it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def train_with_gradient(self, grad_out: torch.Tensor) -> torch.Tensor | None: ...

    def train_with_labels(
        self, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor | None, torch.Tensor]: ...

    def evaluate(self, x: torch.Tensor) -> torch.Tensor: ...


class TrainableModel(Protocol):
    """A model the loop in :func:`fit` can train: one step per batch, and a prediction."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...


class SplitModel:
    """Segments chained by activations forward and gradients backward."""

    def __init__(self, runners: Sequence[SegmentRunner]) -> None:
        if len(runners) < 2:
            raise ValueError("a split model needs at least two segments")
        self.runners = list(runners)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        acts = [x]
        for runner in self.runners[:-1]:
            acts.append(runner.forward(acts[-1]))
        loss, grad, out = self.runners[-1].train_with_labels(acts[-1], y)
        for runner in reversed(self.runners[:-1]):
            if grad is None:
                raise RuntimeError("a downstream segment returned no input gradient")
            grad = runner.train_with_gradient(grad)
        return loss, out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        for runner in self.runners:
            x = runner.evaluate(x)
        return x


class MonolithicModel:
    """The whole model trained by ordinary backprop with one optimizer.

    ``defence`` (``module`` an ``nn.Sequential`` whose first element is A): the training forward adds the noise
    to A's output and the loss NoPeek's term, as the split run does; the reported loss is the label loss.
    """

    def __init__(self, module: nn.Module, optimizer: OptimizerSpec, loss: LossKind = "cross_entropy",
                 defence: Defence | None = None) -> None:
        if defence is not None and not isinstance(module, nn.Sequential):
            raise TypeError("a monolithic model with a defence must be an nn.Sequential of segments")
        self.module = module
        self.optimizer = optimizer.build(module.parameters())
        self.loss_kind = loss
        self.defence = defence

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.module.train()
        with eager_execution():
            extra = None
            if self.defence is None:
                out = self.module(x)
            else:
                assert isinstance(self.module, nn.Sequential)
                h = self.module[0](x)
                extra = self.defence.penalty(x, h)
                out = self.module[1:](self.defence.perturb(h))
            loss = label_loss(out, y, self.loss_kind)
            self.optimizer.zero_grad(set_to_none=True)
            (loss if extra is None else loss + extra).backward()
        self.optimizer.step()
        return float(loss.detach()), out.detach()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        try:
            with eager_execution():
                return self.module(x)
        finally:
            self.module.train()


def torch_split_model(
    modules: Sequence[nn.Module],
    optimizer: OptimizerSpec,
    loss: LossKind = "cross_entropy",
    rule: AuxLossRule = EXACT_RULE,
    defence: Defence | None = None,
) -> SplitModel:
    """A split model of torch segments (the first needs no input gradient; ``defence`` applies to it)."""
    return SplitModel(
        [TorchSegment(m, optimizer, loss=loss, input_grad=i > 0, rule=rule, defence=defence if i == 0 else None)
         for i, m in enumerate(modules)]
    )


def compose(modules: Sequence[nn.Module]) -> nn.Sequential:
    """The monolithic model: the segments (pass copies if the originals train too) run back to back."""
    return nn.Sequential(*modules)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float


@dataclass
class History:
    """Per-epoch metrics of one run."""

    name: str
    epochs: list[EpochMetrics] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "epochs": [asdict(e) for e in self.epochs]}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def fit(
    model: TrainableModel,
    data: Dataset | torch.utils.data.Dataset[Any],
    *,
    name: str,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    loss: LossKind = "cross_entropy",
    progress: bool = True,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> History:
    """Train ``model`` for ``epochs`` on ``data`` in a batch order fixed by ``seed``.

    ``data`` may be a map-style torch Dataset of ``(x, y)``: split 75/25 (seeded, stratified) and used as is.
    """
    # imported here: the simulation package (which holds the data) imports this module at import time
    from .simulation.data import Dataset, batch_indices

    if not isinstance(data, Dataset):
        data = Dataset.from_torch(data, task="regression" if loss == "mse" else "classification")
    history = History(name)
    n = len(data.x_train)
    steps = (n + batch_size - 1) // batch_size
    with tqdm(total=epochs * steps, desc=name, unit="step", disable=not progress, leave=False, mininterval=0.5) as bar:
        for epoch in range(epochs):
            total, correct, seen = 0.0, 0.0, 0
            for idx in batch_indices(n, batch_size, seed=seed, epoch=epoch):
                x, y = data.x_train[idx], data.y_train[idx]
                batch_loss, out = model.step(x, y)
                total += batch_loss * len(idx)
                correct += accuracy(out, y) * len(idx) if loss == "cross_entropy" else 0.0
                seen += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{batch_loss:.4f}")
            logits = model.predict(data.x_test)
            metrics = EpochMetrics(
                epoch=epoch + 1,
                train_loss=total / seen,
                train_accuracy=correct / seen,
                test_loss=float(label_loss(logits, data.y_test, loss)),
                test_accuracy=accuracy(logits, data.y_test) if loss == "cross_entropy" else float("nan"),
            )
            history.epochs.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
    return history


def named_state(modules: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and buffers of all segments by their original qualified names."""
    state: dict[str, torch.Tensor] = {}
    for m in modules:
        for k, v in m.state_dict().items():
            if k in state:
                raise ValueError(f"{k} appears in two segments")
            state[k] = v.detach()
    return state


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |a - b| over all tensors, and the tensor where it occurs.

    Infinity, naming the first such tensor, when a tensor is missing on one side, the shapes differ,
    or either side holds a NaN or an infinity: such runs never count as equal.
    """
    missing = sorted(set(a) ^ set(b))
    if missing:
        return math.inf, missing[0]
    worst, where = 0.0, ""
    for k in sorted(a):
        x, y = a[k].detach(), b[k].detach()
        if x.shape != y.shape or not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
            return math.inf, k
        d = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        if d >= worst:
            worst, where = d, k
    return worst, where
