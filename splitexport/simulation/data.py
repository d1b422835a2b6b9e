"""Datasets and how they are read: the bundled digits (no downloads) and a user's arrays, ``.npz``/``.npy``,
CSV and image folders, raw, with fixed train/test splits; the seeded batch order."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .._errors import SplitExportError
from .._manifest import PreprocessSpec

DATASETS = ("digits",)
Task = Literal["classification", "regression"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def split(x: np.ndarray, y: np.ndarray, task: Task, *, seed: int = SPLIT_SEED) -> tuple[np.ndarray, ...]:
    """A fixed, seeded 75/25 train/test split, stratified by class when every class has two samples."""
    from sklearn.model_selection import train_test_split

    if len(x) < 2:
        raise SplitExportError(f"need at least 2 samples to split into train and test, got {len(x)}")
    strat = None
    if task == "classification":
        _, counts = np.unique(y, return_counts=True)
        n_test = math.ceil(len(y) * TEST_FRACTION)
        if counts.min() >= 2 and n_test >= len(counts) and len(y) - n_test >= len(counts):
            strat = y
    out: list[np.ndarray] = train_test_split(x, y, test_size=TEST_FRACTION, random_state=seed, stratify=strat)
    return tuple(out)


def from_arrays(name: str, x: np.ndarray, y: np.ndarray, *, x_test: np.ndarray | None = None,
                y_test: np.ndarray | None = None, task: Task = "classification",
                preprocess: PreprocessSpec | None = None) -> Dataset:
    """A dataset from arrays (split 75/25 unless a test set is given); raw values, no transform applied."""
    from .data import Dataset

    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise SplitExportError(f"{name}: x has {len(x)} samples but y has {len(y)}")
    if (x_test is None) != (y_test is None):
        raise SplitExportError(f"{name}: give both x_test and y_test, or neither")
    for arr, what in ((x, "x"), (y, "y")) + (((x_test, "x_test"), (y_test, "y_test")) if x_test is not None else ()):
        _check_numeric(np.asarray(arr), f"{name}: {what}")
    if task == "classification":
        for arr, what in ((y, "y"), (y_test, "y_test")):
            if arr is not None and not _integral(np.asarray(arr)):
                raise SplitExportError(f"{name}: class labels in {what} must be whole numbers, got dtype "
                                       f"{np.asarray(arr).dtype}")
    if x_test is None or y_test is None:
        x_tr, x_te, y_tr, y_te = split(x, y, task)
    else:
        x_tr, x_te, y_tr, y_te = x, np.asarray(x_test), y, np.asarray(y_test)
    ydt = torch.int64 if task == "classification" else torch.float32
    num = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1 if task == "classification" else 0
    if preprocess is not None and preprocess.num_classes:
        num = preprocess.num_classes
    return Dataset(name, _tensor(x_tr), torch.as_tensor(y_tr).to(ydt), _tensor(x_te), torch.as_tensor(y_te).to(ydt),
                   num, preprocess)


def _tensor(x: np.ndarray) -> torch.Tensor:
    if np.issubdtype(x.dtype, np.integer):
        return torch.as_tensor(x.astype(np.int64))
    return torch.as_tensor(x.astype(np.float32))


def _integral(a: np.ndarray) -> bool:
    if np.issubdtype(a.dtype, np.integer):
        return True
    return bool(np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)))


def _check_numeric(a: np.ndarray, what: str) -> None:
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise SplitExportError(f"{what} must be numeric, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        first = int(np.argwhere(~np.isfinite(a.reshape(len(a), -1) if a.ndim else a))[0][0]) if a.ndim else 0
        raise SplitExportError(f"{what} holds NaN or Inf (first in sample {first}); clean or impute it first")


def from_npz(path: str | Path, *, task: Task = "classification") -> Dataset:
    """``x`` and ``y`` (optional ``x_test``, ``y_test``) from an ``.npz``; or an ``.npy`` of x beside ``y`` in
    ``<stem>.labels.npy``. Integer ``x`` (token ids) stays int64."""
    path = Path(path)
    if path.suffix == ".npy":
        labels = path.with_name(f"{path.stem}.labels.npy")
        if not labels.is_file():
            raise SplitExportError(f"{path}: an .npy holds only x; put the labels in {labels.name}")
        x, y = np.load(path, allow_pickle=False), np.load(labels, allow_pickle=False)
        kind: Literal["array", "tokens"] = "tokens" if np.issubdtype(x.dtype, np.integer) else "array"
        return from_arrays(path.name, x, y, task=task, preprocess=PreprocessSpec(kind=kind))
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:
        raise SplitExportError(f"{path}: cannot read it as .npz ({exc})") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise SplitExportError(f"{path} has no array {' or '.join(missing)!r}; it holds {', '.join(sorted(arrays))}")
    x = arrays["x"]
    kind = "tokens" if np.issubdtype(x.dtype, np.integer) else "array"
    return from_arrays(path.name, x, arrays["y"], x_test=arrays.get("x_test"), y_test=arrays.get("y_test"),
                       task=task, preprocess=PreprocessSpec(kind=kind))


def from_csv(path: str | Path, target: str | None, *, task: Task = "classification") -> Dataset:
    """A table: every column but ``target`` is a numeric feature. A classification target may be text
    (classes are the sorted distinct values, recorded as label names)."""
    path = Path(path)
    if not target:
        raise SplitExportError(f"{path.name} is a CSV: name the label column with --target COLUMN")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise SplitExportError(f"{path} is empty")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    if target not in header:
        raise SplitExportError(f"--target {target!r} is not a column of {path.name}; columns: {', '.join(header)}")
    if not body:
        raise SplitExportError(f"{path} has a header but no rows")
    bad_rows = [i + 2 for i, r in enumerate(body) if len(r) != len(header)]
    if bad_rows:
        raise SplitExportError(f"{path.name} line {bad_rows[0]} has a different number of fields than the header")
    t = header.index(target)
    features = [h for i, h in enumerate(header) if i != t]
    cols: dict[str, list[float]] = {}
    text: list[str] = []
    for i, h in enumerate(header):
        if i == t:
            continue
        try:
            cols[h] = [float(r[i]) if r[i].strip() else math.nan for r in body]
        except ValueError:
            text.append(h)
    if text:
        raise SplitExportError(f"{path.name}: column(s) {', '.join(map(repr, text))} are not numeric; encode them "
                               "as numbers (e.g. one-hot) or drop them")
    x = np.array([cols[h] for h in features], dtype=np.float32).T
    raw_y = [r[t].strip() for r in body]
    label_names: list[str] = []
    try:
        y = np.array([float(v) for v in raw_y], dtype=np.float64)
    except ValueError:
        if task == "regression":
            raise SplitExportError(f"{path.name}: target {target!r} is not numeric, but the bundle's loss is "
                                   "mse (regression)") from None
        label_names = sorted(set(raw_y))
        y = np.array([label_names.index(v) for v in raw_y], dtype=np.int64)
    if task == "classification" and not label_names:
        if not _integral(y):
            raise SplitExportError(f"{path.name}: target {target!r} holds non-integer values, but the bundle is a "
                                   "classifier (partition --loss mse for regression)")
        y = y.astype(np.int64)
    spec = PreprocessSpec(kind="table", feature_names=features, label_names=label_names, num_classes=len(label_names))
    return from_arrays(path.name, x, y.astype(np.float32) if task == "regression" else y, task=task,
                       preprocess=spec)


def from_image_folder(path: str | Path, *, size: Sequence[int], channels: int) -> Dataset:
    """The ImageFolder convention: one subfolder per class (sorted names are the classes), PNG/JPEG files
    resized to ``size`` = (H, W) with bilinear filtering, as ``L`` (1 channel) or ``RGB`` (3); pixels 0..255."""
    from PIL import Image

    path = Path(path)
    if channels not in (1, 3):
        raise SplitExportError(f"an image folder feeds 1- or 3-channel inputs, but the bundle's input has "
                               f"{channels} channels")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SplitExportError(f"{path} has no class subfolders (one folder of images per class)")
    mode = "L" if channels == 1 else "RGB"
    h, w = int(size[0]), int(size[1])
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (path / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SplitExportError(f"class folder {name!r} in {path} holds no PNG/JPEG images")
        for f in files:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert(mode).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
            except OSError as exc:
                raise SplitExportError(f"cannot read image {f}: {exc}") from exc
            xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            ys.append(label)
    spec = PreprocessSpec(kind="image", scale=1 / 255, image_size=[h, w], channel_order=mode, label_names=classes,
                          num_classes=len(classes))
    return from_arrays(path.name, np.stack(xs), np.array(ys, dtype=np.int64), preprocess=spec)


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
        return from_arrays(name, x, y, x_test=x_test, y_test=y_test, task=task, preprocess=PreprocessSpec(
            kind="tokens" if np.issubdtype(np.asarray(x).dtype, np.integer) else "array"))

    @classmethod
    def from_npz(cls, path: str | Path, *, task: Task = "classification") -> Dataset:
        return from_npz(path, task=task)

    @classmethod
    def from_csv(cls, path: str | Path, target: str, *, task: Task = "classification") -> Dataset:
        return from_csv(path, target, task=task)

    @classmethod
    def from_image_folder(cls, path: str | Path, *, size: Sequence[int], channels: int = 3) -> Dataset:
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
