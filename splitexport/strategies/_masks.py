"""AdaSplit's per-client multiplicative masks on the server segment (sparse partitions of B)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .._torch_segment import ProvisionalStep, TorchSegment, UnsafeUpdate


class ClientMasks:
    """One real-valued mask per client for each weight matrix / kernel (``dim >= 2``) of B.

    Client ``i`` sees B as ``W * m_i`` and trains on ``L_ce + lam * |m_i|_1`` (AdaSplit
    eq. 7-8): ``W`` gets ``m_i * dL/dW_eff`` (it is updated only where ``m_i`` is
    non-zero), ``m_i`` gets ``W * dL/dW_eff + lam * sign(m_i)``. Masks start at 1 (the
    full shared model), use B's optimizer type and learning rate, and stay on the server.
    The multiplication is done by swapping parameter values, so TorchScript segments work.

    B's step and the mask's are one step (:meth:`TorchSegment.keep_staged`): on a checked server segment, a step
    that would make B or the mask (or either optimizer's state) non-finite, or whose gradient norm (B's, or the
    mask's) exceeds ``max_grad_norm``, is refused with :class:`~splitexport.UnsafeUpdate` and changes neither.
    """

    def __init__(self, server: TorchSegment, lam: float) -> None:
        self.server = server
        self.lam = lam
        self.names = [n for n, p in server.module.named_parameters() if p.requires_grad and p.dim() >= 2]
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._steps: dict[str, ProvisionalStep] = {}

    def mask(self, client: str) -> dict[str, torch.Tensor]:
        if client not in self.masks:
            params = dict(self.server.module.named_parameters())
            self.masks[client] = {n: torch.ones_like(params[n]).requires_grad_(True) for n in self.names}
            opt = self.server.optimizer
            defaults = {**opt.defaults, "lr": opt.param_groups[0]["lr"]}
            self.optimizers[client] = type(opt)(list(self.masks[client].values()), **defaults)
            self._steps[client] = ProvisionalStep(self.optimizers[client], f"the mask of client {client!r}")
        return self.masks[client]

    @contextmanager
    def _applied(self, client: str) -> Iterator[tuple[dict[str, torch.nn.Parameter], dict[str, torch.Tensor]]]:
        params = dict(self.server.module.named_parameters())
        masks = self.mask(client)
        originals = {n: params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(originals[n] * masks[n])
        try:
            yield params, originals
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(originals[n])

    def train_step(self, client: str, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One masked step of B on ``client``'s activations; returns (server loss, detached output).

        :class:`UnsafeUpdate` when the server segment refuses the step: nothing changed, not even a first step's
        new mask."""
        new = client not in self.masks
        server, masks = self.server, self.mask(client)
        self.optimizers[client].zero_grad(set_to_none=True)
        with self._applied(client) as (params, originals):
            ce, _, out = server.stage_labels(x, labels)
            with torch.no_grad():
                l1 = sum(float(m.abs().sum()) for m in masks.values())
                for n in self.names:
                    g = params[n].grad
                    if g is None:
                        continue
                    masks[n].grad = g * originals[n] + self.lam * masks[n].sign()
                    params[n].grad = g * masks[n]
        try:
            server.keep_staged(self._steps[client])
        except UnsafeUpdate:
            if new:
                del self.masks[client], self.optimizers[client], self._steps[client]
            raise
        return ce + self.lam * l1, out

    @torch.no_grad()
    def evaluate(self, client: str, x: torch.Tensor) -> torch.Tensor:
        with self._applied(client):
            return self.server.evaluate(x)

    def sparsity(self, client: str, threshold: float = 1e-2) -> float:
        """Fraction of ``client``'s mask entries with ``|m| < threshold``."""
        masks = self.mask(client).values()
        total = sum(m.numel() for m in masks)
        return sum(int((m.abs() < threshold).sum()) for m in masks) / max(total, 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {c: {n: m.detach().clone() for n, m in ms.items()} for c, ms in self.masks.items()},
            "optimizers": {c: o.state_dict() for c, o in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for client, ms in state["masks"].items():
            mine = self.mask(client)
            with torch.no_grad():
                for n, m in ms.items():
                    mine[n].copy_(m)
            self.optimizers[client].load_state_dict(state["optimizers"][client])
