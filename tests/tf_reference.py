"""Torch reference runs for the TF.js / TFLite equivalence tests (shared by Python and Node tests).

A :class:`Case` is one device segment trained for ``steps`` steps by the exact update
rule in torch (``splitexport._update_rule``): a segment that is not last trains on
fixed pseudo-random output gradients, the last one on labels. The exported segment
must reproduce the weights and input gradients.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from splitexport import OptimizerSpec, load_dataset, partition
from splitexport._update_rule import aux_loss, label_loss
from splitexport.models import FACTORIES

STEPS = 20
BATCH = 16
TOL = 1e-5
STATS_TOL = 1e-4
"""BatchNorm running statistics after a free-running run, relative to max(1, |value|): they integrate
the batch statistics of every step, so the (<= 1e-6) weight differences accumulate in them."""
GRAD_SCALE = 1e-3
"""Size of the pseudo-random output gradients (about a mean-reduced loss's gradient at batch 16)."""


class Zoo(nn.Module):
    """Every supported layer kind in one small 1x8x8 -> 10 model."""

    def __init__(self, act: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.Tanh()
        self.branch = nn.Conv2d(8, 4, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.pool = nn.MaxPool2d(2)
        self.act2 = act()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(80, 32)
        self.bn2 = nn.BatchNorm1d(32)
        self.act3 = nn.ReLU()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        h = torch.cat([self.branch(h), self.dw(h)], dim=1)
        h = self.flatten(self.act2(self.pool(h)))
        return self.fc2(self.drop(self.act3(self.bn2(self.fc1(h)))))


@dataclass(frozen=True)
class Case:
    """One segment to train: ``arch`` cut at ``cuts`` (or the whole Zoo model), segment ``segment``."""

    name: str
    arch: str
    cuts: tuple[str, ...] = ()
    segment: str = "A"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "sgd", "lr": 0.05})
    is_last: bool | None = None
    """Only for whole-model (Zoo) cases: train on labels (True) or on a gradient (False)."""
    builtin: bool = True
    """Whether the builtin-ops TFLite variant supports the segment."""
    model: Callable[[], nn.Module] | None = None
    """A whole model to trace and train as one segment (instead of ``arch``), on ``input_shape``."""
    input_shape: tuple[int, ...] = (BATCH, 1, 8, 8)
    loss: str = "cross_entropy"
    """The last segment's label loss; ``mse`` trains on random targets shaped like the output."""
    input_dtype: str = "float32"
    """``int64`` for token ids, drawn from ``range(vocab)``."""
    vocab: int = 0
    kinks: bool = False
    """A ReLU at the segment output: a float-rounding-sized difference can flip an output across 0
    and send the free-running trajectory elsewhere (torch itself does so under a 1e-7 weight
    perturbation), so only the per-step comparison is asserted for the whole run."""


CASES = [
    Case("mlp_A", "mlp", ("relu1", "relu2"), "A"),
    Case("mlp_C", "mlp", ("relu1", "relu2"), "C"),
    Case(
        "resnet_A",
        "resnet_cnn",
        ("layer1", "layer3"),
        "A",
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        kinks=True,
    ),
    Case("resnet_C_deep", "resnet_cnn", ("stem", "layer2"), "C"),
    Case("mobilenet_A", "mobilenet_cnn", ("block1", "block3"), "A", kinks=True),
    Case("zoo_labels", "zoo", is_last=True),
    Case("zoo_gradient", "zoo", is_last=False, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}),
    Case("zoo_gelu_labels", "zoo_gelu", is_last=True, builtin=False),
    Case("mlp_A_adam", "mlp", ("relu1", "relu2"), "A", {"name": "adam", "lr": 0.01, "weight_decay": 1e-3}),
    Case("mlp_C_adamw", "mlp", ("relu1", "relu2"), "C", {"name": "adamw", "lr": 0.01, "weight_decay": 0.05,
                                                           "betas": (0.8, 0.99), "eps": 1e-6}),
]


@dataclass
class Reference:
    """The untrained segment, the training data per step, and what torch computed."""

    module: nn.Module
    input_shape: tuple[int, ...]
    is_last: bool
    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    """Per step: labels (int64) for the last segment, else dL/d(output) (float32)."""
    losses: list[float]
    grad_inputs: list[np.ndarray]
    forward0: np.ndarray
    """Training-mode output of the untrained segment on ``inputs[0]``."""
    state: dict[str, np.ndarray]
    """Trained state dict (weights and BatchNorm statistics)."""
    eval_out: np.ndarray
    """Inference-mode output of the trained segment on ``inputs[0]``."""
    states: list[dict[str, np.ndarray]]
    """State dict before each step, and after the last (``steps + 1`` entries)."""
    momentum: list[dict[str, np.ndarray]]
    """Optimizer state before each step by ``<torch param>/<slot>`` (slots ``momentum``, or ``exp_avg`` and
    ``exp_avg_sq``; empty for plain SGD) and ``optimizer/step`` (Adam's step count)."""


def segment_of(case: Case) -> tuple[nn.Module, tuple[int, ...], bool]:
    torch.manual_seed(0)
    if case.model is not None:
        assert case.is_last is not None
        return fx.symbolic_trace(case.model()), case.input_shape, case.is_last
    if case.arch.startswith("zoo"):
        model = Zoo(nn.GELU if case.arch == "zoo_gelu" else nn.Sigmoid)
        assert case.is_last is not None
        return fx.symbolic_trace(model), (BATCH, 1, 8, 8), case.is_last
    part = partition(FACTORIES[case.arch](), list(case.cuts), torch.zeros(BATCH, 1, 8, 8))
    seg = part.segment(case.segment)
    return seg.module, seg.input_shape, seg.is_last


def reference(case: Case, steps: int = STEPS) -> Reference:
    """Train a copy of the case's segment in torch with SGD (or the case's optimizer)."""
    module, shape, is_last = segment_of(case)
    return train_reference(module, shape, is_last, case.optimizer, loss=case.loss, steps=steps,
                           input_dtype=case.input_dtype, vocab=case.vocab)


def train_reference(module: nn.Module, shape: tuple[int, ...], is_last: bool, optimizer: dict[str, Any],
                    *, loss: str = "cross_entropy", steps: int = STEPS, input_dtype: str = "float32",
                    vocab: int = 0) -> Reference:
    """Train a copy of ``module`` (input ``shape`` with the batch) for ``steps`` steps in torch: on labels
    (``loss``) when it is the last segment, else on pseudo-random output gradients. Integer inputs
    (``input_dtype`` int64 / int32) are token ids drawn from ``range(vocab)``.

    A TorchScript module (a bundle's segment) runs without the JIT's optimizing executor: its first
    runs re-profile and re-compile the graph (a 20-step zoo reference took 17-22 s instead of 4.6 s,
    with the same trained weights); the reference needs plain op-by-op execution, not fusion."""
    with torch.jit.optimized_execution(False):
        return _train_reference(module, shape, is_last, optimizer, loss=loss, steps=steps, input_dtype=input_dtype,
                                vocab=vocab)


def _train_reference(module: nn.Module, shape: tuple[int, ...], is_last: bool, optimizer: dict[str, Any],
                     *, loss: str, steps: int, input_dtype: str, vocab: int) -> Reference:
    digits = load_dataset("digits")
    gen = torch.Generator().manual_seed(1234)
    trained = _copy(module).train()
    o = optimizer
    opt = OptimizerSpec(**o).build(trained.parameters())
    out_shape = tuple(trained(torch.zeros(shape, dtype=getattr(torch, input_dtype))).shape)
    trained.load_state_dict(module.state_dict())  # undo the BN update of the shape probe
    inputs, targets, losses, grads = [], [], [], []
    states, momentum = [], []
    names = {id(p): n for n, p in trained.named_parameters()}
    forward0 = None
    for step in range(steps):
        states.append(_state(trained))
        momentum.append(_optimizer_state(opt, names))
        if input_dtype != "float32":
            x = torch.randint(0, vocab, shape, generator=gen, dtype=getattr(torch, input_dtype))
            y = torch.randint(0, int(out_shape[-1]) if is_last else 10, (shape[0],), generator=gen)
        elif shape[1:] == (1, 8, 8):
            idx = torch.randint(0, len(digits.x_train), (BATCH,), generator=gen)
            x, y = digits.x_train[idx], digits.y_train[idx]
        else:
            x = torch.randn(shape, generator=gen).relu()
            y = torch.randint(0, int(out_shape[-1]) if is_last else 10, (shape[0],), generator=gen)
        xr = x.clone().requires_grad_(x.is_floating_point())
        out = trained(xr)
        if forward0 is None:
            forward0 = out.detach().numpy().copy()
        if is_last and loss == "mse":
            y = torch.randn(out_shape, generator=gen)
        if is_last:
            loss_value = label_loss(out, y, loss)  # type: ignore[arg-type]
            target = y.numpy()
        else:
            g = torch.randn(out_shape, generator=gen) * GRAD_SCALE
            loss_value = aux_loss(out, g)
            target = g.numpy()
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        inputs.append(x.numpy())
        targets.append(target)
        losses.append(float(loss_value.detach()))
        grads.append(xr.grad.numpy().copy() if xr.grad is not None else np.zeros(0, np.float32))  # ids: none
    trained.eval()
    with torch.no_grad():
        eval_out = trained(torch.from_numpy(inputs[0])).numpy()
    state = _state(trained)
    states.append(state)
    assert forward0 is not None
    return Reference(
        module, shape, is_last, inputs, targets, losses, grads, forward0, state, eval_out, states, momentum
    )


def _copy(module: nn.Module) -> nn.Module:
    """An independent copy (TorchScript modules through save / load: deepcopy leaves non-leaf parameters)."""
    if isinstance(module, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        return torch.jit.load(buf)  # type: ignore[no-any-return]
    return copy.deepcopy(module)


def _optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, np.ndarray]:
    """Slots by ``<param>/<slot>`` in the export's slot names, plus ``optimizer/step`` (Adam)."""
    out: dict[str, np.ndarray] = {}
    for p, st in opt.state.items():
        for key, slot in (("momentum_buffer", "momentum"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            if st.get(key) is not None:
                out[f"{names[id(p)]}/{slot}"] = st[key].numpy().copy()
        if "step" in st:
            out["optimizer/step"] = np.asarray([float(st["step"])], np.float32)
    return out


def _state(module: nn.Module) -> dict[str, np.ndarray]:
    return {
        k: v.detach().numpy().copy() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")
    }


def tf_state(name_map: dict[str, list[str]], torch_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Torch-named arrays in the export's names and layouts (``name_map`` from the export metadata)."""
    from splitexport.export._layergraph import torch_to_tf_layout

    return {k: torch_to_tf_layout(torch_state[t], tr) for k, (t, tr) in name_map.items() if t in torch_state}


def tf_optimizer_state(name_map: dict[str, list[str]], opt_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:attr:`Reference.momentum` in the export's names (``<weight>/<slot>``) and layouts."""
    from splitexport.export._layergraph import torch_to_tf_layout

    by_torch = {t: (k, tr) for k, (t, tr) in name_map.items()}
    out = {}
    for key, value in opt_state.items():
        param, slot = key.rsplit("/", 1)
        if key == "optimizer/step":
            out[key] = value
        elif param in by_torch:
            name, layout = by_torch[param]
            out[f"{name}/{slot}"] = torch_to_tf_layout(value, layout)
    return out


def _worst(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: list[str], relative: bool) -> tuple[float, str]:
    """Largest (relative) difference over ``keys`` and where; infinity naming the tensor when it is missing on
    either side, the shapes differ, or either side holds a NaN or an infinity (such runs are never equal)."""
    assert keys, "nothing to compare"
    worst, where = 0.0, ""
    for k in keys:
        if k not in a or k not in b:
            return math.inf, k
        x, y = np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64)
        if x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
            return math.inf, k
        d = np.abs(x - y) / np.maximum(1.0, np.abs(y)) if relative else np.abs(x - y)
        if d.size and float(d.max()) >= worst:
            worst, where = float(d.max()), k
    return worst, where


def max_diff_where(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: list[str] | None = None) -> tuple[float, str]:
    """Largest absolute difference over the common (or given) keys, and the tensor where it occurs."""
    return _worst(a, b, keys if keys is not None else sorted(set(a) & set(b)), relative=False)


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: list[str] | None = None) -> float:
    """Largest absolute difference over the common (or given) keys; infinity on NaN/Inf or a shape mismatch."""
    return max_diff_where(a, b, keys)[0]


def max_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: list[str]) -> float:
    """Largest ``|a - b| / max(1, |b|)`` over ``keys`` (for BatchNorm running statistics, which can be large)."""
    return _worst(a, b, keys, relative=True)[0]
