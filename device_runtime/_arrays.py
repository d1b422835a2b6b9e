"""Small array helpers shared by the device runtimes."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_float32", "batch_labels"]


def as_float32(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy copy of a torch tensor (what the interpreters take)."""
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


def batch_labels(labels: object, x: np.ndarray, error: type[Exception]) -> np.ndarray:
    """``labels`` as an array, checked to hold one entry per row of ``x`` (else ``error``)."""
    y = np.asarray(labels)
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise error(f"labels batch {y.shape[0] if y.ndim else 'none (a scalar)'} != input batch {x.shape[0]}")
    return y
