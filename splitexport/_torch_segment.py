"""Training one segment in torch by the shared update rule (used in process and by the server)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ._manifest import OptimizerSpec
from ._update_rule import EXACT_RULE, AuxLossRule, LossKind, label_loss

if TYPE_CHECKING:
    from .defence import Defence


class UnsafeUpdate(ValueError):
    """The staged step was refused (and undone): its gradient norm is over the limit, or it would make a weight
    or an optimizer state non-finite."""

    def __init__(self, reason: Literal["non_finite", "gradient_norm"], message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProvisionalStep:
    """One optimizer's step, taken provisionally and checked: :meth:`keep` keeps it, :meth:`undo` restores the
    parameters and the optimizer state exactly (B's step in :class:`TorchSegment`, and any other optimizer's step
    that must stand or fall with it, such as AdaSplit's per-client masks).

    Cheap per step: the weights and optimizer state are copied into buffers kept from the last step (one
    ``_foreach_copy_``), and the step's result is checked with one sum per tensor (a sum is finite only when
    every element is; a non-finite sum of finite values, an overflow, is confirmed element-wise).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str = "B") -> None:
        self.optimizer = optimizer
        self.name = name
        """What the parameters are, in :class:`UnsafeUpdate`'s message."""
        self._before: tuple[list[torch.Tensor], dict[torch.Tensor, dict[str, Any]]] | None = None
        """While a step is taken: the tensors it changes in place (weights, then optimizer states) and each
        parameter's state dict as it was; their values before the step are in ``_saved``."""
        self._saved: list[torch.Tensor] = []

    @property
    def taken(self) -> bool:
        """A provisional step is taken, neither kept nor undone yet."""
        return self._before is not None

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def take(self, max_grad_norm: float | None = None) -> None:
        """Take the step provisionally on the staged gradients. :class:`UnsafeUpdate` (nothing changed, the
        gradients still staged) when their L2 norm exceeds ``max_grad_norm`` or is not finite, or when a weight or
        an optimizer state would become non-finite."""
        if self._before is not None:
            raise RuntimeError("a provisional step is already taken")
        params = self.params()
        if max_grad_norm is not None and not (norm := self._grad_norm(params)) <= max_grad_norm:
            raise UnsafeUpdate("gradient_norm", f"the gradient norm of the parameters of {self.name} is {norm:.6g}, "
                               f"above the limit max_grad_norm={max_grad_norm:g}")
        self._snapshot(params)
        self.optimizer.step()
        bad = self._non_finite(params)
        if bad is not None:
            norm = self._grad_norm(params)
            self.undo()
            raise UnsafeUpdate("non_finite", f"the step would make {bad} of {self.name} non-finite (gradient norm "
                               f"{norm:.6g})")

    def keep(self) -> None:
        """Keep the provisional step, or take the step now (unchecked) when none is taken."""
        if self._before is None:
            self.optimizer.step()
        self._before = None

    def undo(self) -> None:
        """Restore the parameters and the optimizer state from before the provisional step (if one is taken)."""
        if self._before is None:
            return
        live, dicts = self._before
        self._before = None
        with torch.no_grad():
            torch._foreach_copy_(live, self._saved)
        for p in self.params():
            if p in dicts:
                self.optimizer.state[p] = dicts[p]
            else:
                self.optimizer.state.pop(p, None)

    def _snapshot(self, params: list[torch.Tensor]) -> None:
        """Keep what the optimizer step changes: the weights, and each parameter's state (its dict, and the values
        of its tensors, copied into the buffers of the last snapshot when their shapes still match)."""
        state = self.optimizer.state
        dicts = {p: dict(state[p]) for p in params if p in state}
        live = [p.detach() for p in params] + [v for d in dicts.values() for v in d.values()
                                               if isinstance(v, torch.Tensor)]
        saved = self._saved
        if len(saved) != len(live) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(saved, live)):
            saved = self._saved = [t.detach().clone() for t in live]
        else:
            with torch.no_grad():
                torch._foreach_copy_(saved, live)
        self._before = (live, dicts)

    def _non_finite(self, params: list[torch.Tensor]) -> str | None:
        """The first weight or floating optimizer state of ``params`` with a NaN or Inf, or None."""
        state = self.optimizer.state
        tensors = [p.detach() for p in params] + [v for p in params for v in state.get(p, {}).values()
                                                  if isinstance(v, torch.Tensor) and v.is_floating_point()]
        with torch.no_grad():
            if bool(torch.stack([t.sum() for t in tensors]).isfinite().all()):
                return None
            for i, t in enumerate(tensors):  # rare: find it (or find that a sum overflowed)
                if not bool(torch.isfinite(t).all()):
                    if i < len(params):
                        return f"parameter {i}"
                    k = i - len(params)
                    for j, p in enumerate(params):
                        names = [n for n, v in state.get(p, {}).items()
                                 if isinstance(v, torch.Tensor) and v.is_floating_point()]
                        if k < len(names):
                            return f"optimizer state {names[k]!r} of parameter {j}"
                        k -= len(names)
        return None

    @staticmethod
    def _grad_norm(params: list[torch.Tensor]) -> float:
        norms = [torch.linalg.vector_norm(p.grad.detach().double()) for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def eager_execution() -> AbstractContextManager[None]:
    """Run TorchScript segments as plain torch ops (in any thread).

    After a few profiling runs TorchScript's executor fuses ops and re-derives
    gradients, which changes float rounding; the setting is per thread.
    """
    return torch.jit.optimized_execution(False)  # type: ignore[return-value]


class TorchSegment:
    """A segment with its own optimizer.

    ``forward`` keeps the autograd graph of the last call, so ``train_with_gradient``
    applies the auxiliary-loss step without running the segment (and its BatchNorm
    statistics) a second time. ``train_with_labels`` is the last segment's step.
    Both return ``dL/d(input)`` when ``input_grad`` is set (every segment but the first).

    ``device``: where the module and its optimizer live (move the module before building, as the
    server does); inputs are moved there once per call and results come back on the CPU.
    ``grad_hook(params, batch)``, when set, runs after every backward and before the optimizer step
    (the replicated server all-reduces B's gradients there, :mod:`splitexport.strategies._reduce`).
    ``defence`` (the first segment only): ``forward`` sends ``out + S * noise`` and the aux-loss step adds
    NoPeek's ``W * dCor(input, out)`` (:mod:`splitexport.defence`).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: OptimizerSpec,
        *,
        loss: LossKind = "cross_entropy",
        input_grad: bool = True,
        rule: AuxLossRule = EXACT_RULE,
        restorable: bool = False,
        device: torch.device | str = "cpu",
        defence: Defence | None = None,
        checked: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.module = module
        self.defence = defence
        self.optimizer = optimizer.build([p for p in module.parameters() if p.requires_grad])
        self.loss_kind = loss
        self.input_grad = input_grad
        self.rule = rule
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._buffers = list(module.buffers()) if restorable else []
        """``restorable``: keep a copy of the buffers (BatchNorm statistics) from before each forward, so that
        :meth:`discard_pending` leaves no trace of an abandoned step (the server's rollback)."""
        self._saved_buffers: list[torch.Tensor] | None = None
        self._staged = False
        self._step = ProvisionalStep(self.optimizer)
        """B's optimizer step, taken provisionally by :meth:`try_staged`."""
        self.grad_hook: Callable[[list[torch.Tensor], int], None] | None = None
        self.checked = checked
        """``train_with_gradient`` / ``train_with_labels`` / :meth:`keep_staged` keep a step only when
        :meth:`try_staged` (with ``max_grad_norm``) accepts it; otherwise it leaves no trace and
        :class:`UnsafeUpdate` is raised (B of a server strategy, whose steps the strategies take through these
        methods)."""
        self.max_grad_norm = max_grad_norm

    @property
    def has_pending(self) -> bool:
        """A forward waits for its gradient, or a staged step for :meth:`apply_staged`."""
        return self._pending is not None or self._staged

    @property
    def pending_output(self) -> torch.Tensor | None:
        return None if self._pending is None else self._pending[1]

    def discard_pending(self) -> None:
        """Forget the pending forward or staged step: gradients dropped, buffers as before the forward."""
        self._pending = None
        self._step.undo()
        if self._staged:
            self.optimizer.zero_grad(set_to_none=True)
            self._staged = False
        if self._saved_buffers is not None:
            with torch.no_grad():
                for b, saved in zip(self._buffers, self._saved_buffers, strict=True):
                    b.copy_(saved)
            self._saved_buffers = None

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._buffers:
            self._saved_buffers = [b.detach().clone() for b in self._buffers]
        self.module.train()
        x = x.detach().to(self.device).requires_grad_(self.input_grad)
        with eager_execution():
            return x, self.module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Train-mode forward; returns the (detached) output to send downstream."""
        x_in, out = self._run(x)
        self._pending = (x_in, out)
        if self.defence is not None:
            with torch.no_grad():
                return self.defence.perturb(out.detach()).cpu()
        return out.detach().cpu()

    def train_with_gradient(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Aux-loss step for the output of the last ``forward``; returns ``dL/d(input)``."""
        if self._pending is None:
            raise RuntimeError("train_with_gradient called without a preceding forward")
        grad = self.stage_gradient(grad_out)
        self.keep_staged()
        return grad

    def train_with_labels(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor | None, torch.Tensor]:
        """Label-loss step; returns (loss, ``dL/d(input)``, detached output)."""
        result = self.stage_labels(x, labels)
        self.keep_staged()
        return result

    def keep_staged(self, *also: ProvisionalStep) -> None:
        """Apply the staged step, and the steps ``also`` (other optimizers' gradients staged with it, such as
        AdaSplit's mask of the client). When ``checked``, all of them or none: each is taken provisionally with
        ``max_grad_norm``, and if one is refused, every one is undone (their gradients dropped), the pending step
        discarded, and :class:`UnsafeUpdate` raised."""
        if self.checked:
            try:
                self.try_staged(self.max_grad_norm)
                for step in also:
                    step.take(self.max_grad_norm)
            except UnsafeUpdate:
                for step in also:
                    step.undo()
                    step.optimizer.zero_grad(set_to_none=True)
                self.discard_pending()
                raise
        self.apply_staged()
        for step in also:
            step.keep()

    def stage_gradient(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        """:meth:`train_with_gradient` up to the optimizer step (the weights do not change yet)."""
        if self._pending is None:
            raise RuntimeError("train_with_gradient called without a preceding forward")
        x_in, out = self._pending
        self._pending = None
        loss = self.rule.loss_from_grad(out, grad_out.to(self.device))
        extra = None if self.defence is None else self.defence.penalty(x_in, out)
        return self._backward(loss if extra is None else loss + extra, x_in)

    def stage_labels(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor | None, torch.Tensor]:
        """:meth:`train_with_labels` up to the optimizer step (the weights do not change yet)."""
        x_in, out = self._run(x)
        loss = label_loss(out, labels.to(self.device), self.loss_kind)
        grad = self._backward(loss, x_in)
        return float(loss.detach()), grad, out.detach().cpu()

    def apply_staged(self) -> None:
        """The optimizer step of the staged gradients (kept as is when :meth:`try_staged` took it)."""
        if not self._staged:
            raise RuntimeError("apply_staged called without a staged step")
        self._step.keep()
        self._staged = False
        self._saved_buffers = None

    def _params(self) -> list[torch.Tensor]:
        return self._step.params()

    def try_staged(self, max_grad_norm: float | None = None) -> None:
        """Take the staged optimizer step provisionally (:meth:`ProvisionalStep.take`): :meth:`apply_staged` keeps
        it, :meth:`discard_pending` undoes it. :class:`UnsafeUpdate` (the step undone, the gradients still staged)
        when the gradients' L2 norm exceeds ``max_grad_norm`` or is not finite, or when a weight or an optimizer
        state would become non-finite."""
        if not self._staged or self._step.taken:
            raise RuntimeError("try_staged called without a staged step")
        self._step.take(max_grad_norm)

    def _backward(self, loss: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor | None:
        self.optimizer.zero_grad(set_to_none=True)
        with eager_execution():
            loss.backward()
        self._staged = True
        if self.grad_hook is not None:
            self.grad_hook(self._params(), int(x_in.shape[0]))
        return x_in.grad.detach().cpu() if self.input_grad and x_in.grad is not None else None

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward (BatchNorm running statistics, no dropout); changes nothing."""
        was_training = self.module.training
        self.module.eval()
        try:
            with eager_execution():
                return self.module(x.to(self.device)).cpu()
        finally:
            self.module.train(was_training)
