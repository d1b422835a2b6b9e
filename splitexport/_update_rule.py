"""The auxiliary-loss update rule and the label loss: the one place both are defined.

A segment whose output ``out`` receives ``g = dL/d(out)`` from downstream trains on

    L_aux = 0.5 * sum((out - t) ** 2)   with the detached target   t = out - g

so ``dL_aux/d(out) = out - t = g`` and its weight gradients equal true backprop.
The last segment trains on the label loss of the whole model (mean-reduced
cross-entropy by default, mean-reduced MSE for regression).

The server, the device runtimes and the exporters use or mirror these functions
and are tested against them.

Precision: the rule is evaluated in float64. In float32, ``out - (out - g)``
keeps only the bits of ``g`` that survive next to ``|out|``: with ``|g| ~ 1e-5``
and ``|out| ~ 1`` (typical at a cut) each recovered gradient element is off by up
to ~1e-2 relative, and BatchNorm layers amplify that into visible weight drift.
In float64 the recovered gradient, cast back to float32, equals ``g`` exactly
whenever ``|g| / |out| > 2**-29``. Runtimes without float64 should use the
equivalent form ``sum(out * g)`` (same gradient, no cancellation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["cross_entropy", "mse"]
LOSS_KINDS: tuple[LossKind, ...] = ("cross_entropy", "mse")


@dataclass(frozen=True)
class AuxLossRule:
    """The auxiliary-loss rule ``L = scale * sum((out - t)^2)``, ``t = out - sign * g``.

    The exact rule is ``sign=+1, scale=0.5``, evaluated in float64 (:data:`EXACT_RULE`). The other
    parameters exist so tests can show that the seeds' variants (``t = out + g``; sum-MSE without
    the 0.5) and the float32 form break equivalence; nothing else should change them.
    """

    sign: float = 1.0
    scale: float = 0.5
    dtype: torch.dtype = torch.float64
    """Precision of ``t = out - g`` and of the loss (float32 loses the low bits of ``g``)."""

    def target(self, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Detached target ``t = out - g`` (in ``dtype``) for the received gradient ``g``."""
        if out.shape != grad.shape:
            raise ValueError(f"gradient shape {tuple(grad.shape)} != output shape {tuple(out.shape)}")
        return (out.detach().to(self.dtype) - self.sign * grad.detach().to(self.dtype)).detach()

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``0.5 * sum((out - t)^2)``; its gradient w.r.t. ``out`` is ``out - t``."""
        return self.scale * torch.sum((out.to(self.dtype) - target.detach().to(self.dtype)) ** 2)

    def loss_from_grad(self, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The auxiliary loss for ``out`` given the downstream gradient ``grad``."""
        return self.loss(out, self.target(out, grad))


EXACT_RULE = AuxLossRule()
"""The rule every segment uses: ``t = out - g``, ``L = 0.5 * sum((out - t)^2)``."""


def aux_target(out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Detached target ``t = out - g``."""
    return EXACT_RULE.target(out, grad)


def aux_loss(out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum((out - (out - g).detach())^2)``: backprop of it gives ``g`` at ``out``."""
    return EXACT_RULE.loss_from_grad(out, grad)


def label_loss(output: torch.Tensor, labels: torch.Tensor, kind: LossKind = "cross_entropy") -> torch.Tensor:
    """The label loss of the last segment, mean-reduced over the batch."""
    if kind == "cross_entropy":
        return F.cross_entropy(output, labels.long())
    if kind == "mse":
        return F.mse_loss(output, labels.to(output.dtype).reshape(output.shape))
    raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
