"""Datasets that ship with packages (no downloads), with fixed train/test splits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ._errors import SplitExportError

DATASETS = ("digits",)


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors; images are ``N x C x H x W`` float32, labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def load_dataset(name: str = "digits") -> Dataset:
    """scikit-learn's digits: 1797 8x8 images (pixels / 16), a fixed stratified 75/25 split."""
    if name != "digits":
        raise SplitExportError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return Dataset(
        name, torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te), 10
    )


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Shuffled mini-batch indices for one epoch, identical for the same (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
