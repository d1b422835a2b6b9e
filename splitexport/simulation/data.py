"""Datasets that ship with packages (no downloads), with fixed train/test splits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._errors import SplitExportError
from .._manifest import PreprocessSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .datafiles import Task

DATASETS = ("digits",)


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors; images are ``N x C x H x W`` float32, labels int64 (float32 targets for
    regression). ``preprocess``: the transform to apply (raw data) or applied (prepared data); None for
    the built-in datasets, which are already in the models' scale."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    preprocess: PreprocessSpec | None = None
    prepared: bool = False
    """True once checked against a bundle and transformed (``preprocess`` then is the transform applied)."""

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, *, x_test: np.ndarray | None = None,
                    y_test: np.ndarray | None = None, task: Task = "classification", name: str = "arrays") -> Dataset:
        """Arrays as given (a fixed stratified 75/25 split unless a test set is given)."""
        from .datafiles import from_arrays

        return from_arrays(name, x, y, x_test=x_test, y_test=y_test, task=task, preprocess=PreprocessSpec(
            kind="tokens" if np.issubdtype(np.asarray(x).dtype, np.integer) else "array"))

    @classmethod
    def from_npz(cls, path: str | Path, *, task: Task = "classification") -> Dataset:
        from .datafiles import from_npz

        return from_npz(path, task=task)

    @classmethod
    def from_csv(cls, path: str | Path, target: str, *, task: Task = "classification") -> Dataset:
        from .datafiles import from_csv

        return from_csv(path, target, task=task)

    @classmethod
    def from_image_folder(cls, path: str | Path, *, size: Sequence[int], channels: int = 3) -> Dataset:
        from .datafiles import from_image_folder

        return from_image_folder(path, size=size, channels=channels)

    @classmethod
    def from_torch(cls, ds: torch.utils.data.Dataset[Any], *,
                   task: Task = "classification", name: str = "torch dataset") -> Dataset:
        """Every ``(x, y)`` item of a map-style torch Dataset, split 75/25 (stratified, seeded)."""
        items = [ds[i] for i in range(len(ds))]  # type: ignore[arg-type]
        if not items:
            raise SplitExportError(f"{name} is empty")
        x = torch.stack([torch.as_tensor(a) for a, _ in items]).numpy()
        y = torch.stack([torch.as_tensor(b) for _, b in items]).numpy()
        return cls.from_arrays(x, y, task=task, name=name)


def load_dataset(name: str = "digits") -> Dataset:
    """scikit-learn's digits: 1797 8x8 images (pixels / 16), a fixed stratified 75/25 split."""
    if name != "digits":
        raise SplitExportError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SplitExportError("the digits dataset needs scikit-learn: pip install 'splitexport[sim]'") from exc

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
