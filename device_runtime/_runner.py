"""The part of a device segment runner that does not depend on the runtime (ORT, TFLite)."""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from ._arrays import as_float32

__all__ = ["ArraySegment", "DeviceRunner"]


class ArraySegment(Protocol):
    """A device segment on numpy arrays (``OrtSegment``, ``TfliteSegment``)."""

    def forward(self, x: np.ndarray) -> np.ndarray: ...

    def train_with_gradient(self, x: np.ndarray, grad_out: np.ndarray) -> Any: ...

    def parameters(self) -> dict[str, np.ndarray]: ...


S = TypeVar("S", bound=ArraySegment)


class DeviceRunner(Generic[S]):
    """Torch tensors in and out of an array segment: forward, the aux-loss step, parameters."""

    def __init__(self, segment: S) -> None:
        self.segment = segment
        self._pending: np.ndarray | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._pending = as_float32(x)
        return torch.from_numpy(self.segment.forward(self._pending))

    def train_with_gradient(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        """The step for the last :meth:`forward`'s input; device segments before the server return nothing."""
        if self._pending is None:
            raise RuntimeError("train_with_gradient called without a preceding forward")
        x, self._pending = self._pending, None
        self.segment.train_with_gradient(x, as_float32(grad_out))
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and BatchNorm statistics by their torch names (to compare with torch runs)."""
        return {k: torch.from_numpy(v) for k, v in self.segment.parameters().items()}
