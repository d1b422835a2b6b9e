"""Users' own data for a bundle: read by the kind of file (the readers are in :mod:`.data`), checked against
the bundle, and preprocessed by the transform the manifest records (:class:`PreprocessSpec`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .._errors import SplitExportError
from .._manifest import Manifest, PreprocessSpec
from .data import Dataset, Task, from_csv, from_image_folder, from_npz, load_dataset


def read_data(path: str | Path, manifest: Manifest, *, target: str | None = None) -> Dataset:
    """Read ``path`` (by its kind) for ``manifest``'s bundle, raw (no transform applied)."""
    path = Path(path)
    task: Task = "regression" if manifest.loss.kind == "mse" else "classification"
    shape = manifest.segments[0].input.sample_shape
    if not path.exists():
        raise SplitExportError(f"--data {path}: no such file or folder")
    if path.is_dir():
        if len(shape) != 3:
            raise SplitExportError(f"an image folder needs a bundle input of C x H x W, but it is {shape}")
        return from_image_folder(path, size=shape[1:], channels=shape[0])
    if path.suffix.lower() == ".csv":
        return from_csv(path, target, task=task)
    if path.suffix.lower() in (".npz", ".npy"):
        return from_npz(path, task=task)
    raise SplitExportError(f"--data {path}: unknown format; give a .npz, .npy, .csv or a folder of class folders")


def fit_preprocess(data: Dataset) -> PreprocessSpec:
    """The data's transform with per-channel (axis 1) mean/std of the scaled training split (images and tables)."""
    spec = data.preprocess or PreprocessSpec(kind="array")
    if spec.kind not in ("image", "table"):
        return spec.model_copy(update={"num_classes": data.num_classes})
    x = data.x_train.double() * spec.scale
    dims = [d for d in range(x.ndim) if d != 1]
    mean = x.mean(dim=dims)
    std = x.std(dim=dims, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a constant feature is centred, not divided by 0
    return spec.model_copy(update={"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                                   "num_classes": data.num_classes})


def apply_preprocess(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """``(x * scale - mean[c]) / std[c]`` along axis 1, in float32 (int token ids pass through)."""
    if not x.is_floating_point():
        return x
    out = x.double() * spec.scale
    if spec.mean:
        view = [1, len(spec.mean)] + [1] * (x.ndim - 2)
        out = (out - torch.tensor(spec.mean, dtype=torch.float64).view(view)) / torch.tensor(
            spec.std, dtype=torch.float64).view(view)
    return out.float()


def check_fits(data: Dataset, manifest: Manifest) -> None:
    """One clear error when the data cannot feed this bundle: sample shape, dtype, label range."""
    inp = manifest.segments[0].input
    got = tuple(data.x_train.shape[1:])
    if got != inp.sample_shape or tuple(data.x_test.shape[1:]) != inp.sample_shape:
        raise SplitExportError(f"data {data.name!r} has samples of shape {got}, but the bundle's input is "
                               f"{inp.sample_shape} (batch x {' x '.join(map(str, inp.sample_shape))})")
    want_int = not inp.torch_dtype.is_floating_point
    if want_int != (not data.x_train.is_floating_point()):
        raise SplitExportError(f"data {data.name!r} has {data.x_train.dtype} samples, but the bundle's input is "
                               f"{inp.dtype}" + (" (token ids)" if want_int else " (cast token ids or use a model "
                                                 "that embeds them)"))
    out = manifest.segments[-1].output.sample_shape
    if manifest.loss.kind == "cross_entropy":
        k = out[0]
        for y in (data.y_train, data.y_test):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
                bad = int(y.max()) if int(y.max()) >= k else int(y.min())
                raise SplitExportError(f"data {data.name!r} has label {bad}, but the bundle's classifier has {k} "
                                       f"classes (labels 0..{k - 1})")
    elif math.prod(out) != 1 and tuple(data.y_train.shape[1:]) != out:
        raise SplitExportError(f"data {data.name!r} has targets of shape {tuple(data.y_train.shape[1:])}, but the "
                               f"bundle's output is {out}")


def prepare(data: Dataset, manifest: Manifest) -> Dataset:
    """Check ``data`` against the bundle and apply the manifest's transform (or the one fitted on ``data``)."""

    if data.prepared:
        return data
    if manifest.preprocess is not None:
        data = relabel(data, manifest.preprocess.label_names)
    check_fits(data, manifest)
    out_shape = manifest.segments[-1].output.sample_shape
    if manifest.loss.kind == "mse" and tuple(data.y_train.shape[1:]) != out_shape:  # (N,) -> (N, 1): as the devices
        data = replace(data, y_train=data.y_train.reshape(-1, *out_shape), y_test=data.y_test.reshape(-1, *out_shape))
    if data.preprocess is None:  # the built-in digits: already in the model's scale
        return data
    spec = manifest.preprocess or fit_preprocess(data)
    if spec.kind == "table" and spec.feature_names and data.preprocess.feature_names and \
            spec.feature_names != data.preprocess.feature_names:
        raise SplitExportError(f"data {data.name!r} has columns {data.preprocess.feature_names}, but the bundle "
                               f"was prepared for {spec.feature_names}")
    out = Dataset(data.name, apply_preprocess(data.x_train, spec), data.y_train, apply_preprocess(data.x_test, spec),
                  data.y_test, data.num_classes, spec, prepared=True)
    return out


def load_data(path: str | Path, manifest: Manifest, *, target: str | None = None) -> Dataset:
    """``--data PATH``: read, check and preprocess for ``manifest``'s bundle."""
    return prepare(read_data(path, manifest, target=target), manifest)


def resolve_data(dataset: str | Dataset, manifest: Manifest, *, data: str | Path | None = None,
                 target: str | None = None) -> Dataset:
    """What a command trains on: ``--data PATH`` if given, else a Dataset object or a built-in name; prepared."""

    if data is not None:
        return load_data(data, manifest, target=target)
    if target is not None:
        raise SplitExportError("--target needs --data PATH (a CSV)")
    return prepare(dataset if isinstance(dataset, Dataset) else load_dataset(dataset), manifest)


def preprocess_for(path: str | Path, manifest: Manifest, *, target: str | None = None) -> PreprocessSpec:
    """``partition --data``: the transform fitted on ``path``'s training split, after checking it fits."""
    data = read_data(path, manifest, target=target)
    check_fits(data, manifest)
    return fit_preprocess(data)


def relabel(data: Dataset, names: Sequence[str]) -> Dataset:
    """Labels by name: the data's class ``i`` (``data.preprocess.label_names[i]``) becomes the bundle's class
    ``names.index(...)``, so that a device holding only some classes (a folder per class it has) agrees."""
    mine = data.preprocess.label_names if data.preprocess is not None else []
    if not mine or not names or list(mine) == list(names):
        return data
    unknown = [n for n in mine if n not in names]
    if unknown:
        raise SplitExportError(f"data {data.name!r} has class(es) {', '.join(map(repr, unknown))} that the bundle "
                               f"does not know; its classes are {', '.join(names)}")
    lut = torch.tensor([list(names).index(n) for n in mine], dtype=torch.int64)
    assert data.preprocess is not None
    spec = data.preprocess.model_copy(update={"label_names": list(names), "num_classes": len(names)})
    return replace(data, y_train=lut[data.y_train], y_test=lut[data.y_test], num_classes=len(names), preprocess=spec)


PREPROCESS_LISTS = {"mean": float, "std": float, "image_size": int, "feature_names": str, "label_names": str}
PREPROCESS_KEYS = tuple(PreprocessSpec.model_fields)


def parse_preprocess(items: Sequence[str]) -> dict[str, object]:
    """``partition --preprocess KEY=VALUE ...``: hand-given :class:`PreprocessSpec` fields. Lists are
    comma-separated (``mean=0.485,0.456,0.406``); ``scale`` may be a fraction (``1/255``)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in PREPROCESS_KEYS:
            raise SplitExportError(f"--preprocess takes KEY=VALUE with KEY one of {', '.join(PREPROCESS_KEYS)}; "
                                   f"got {item!r}")
        if key in out:
            raise SplitExportError(f"--preprocess gives {key} twice")
        text = text.strip()
        try:
            if key in PREPROCESS_LISTS:
                kind = PREPROCESS_LISTS[key]
                parts = [p.strip() for p in text.split(",")] if text else []
                out[key] = [kind(p) for p in parts]
            elif key == "scale":
                num, _, den = text.partition("/")
                out[key] = float(num) / float(den) if den else float(num)
            elif key == "num_classes":
                out[key] = int(text)
            else:
                out[key] = text
        except (ValueError, ZeroDivisionError):
            what = {"scale": "a number or a fraction like 1/255", "num_classes": "a whole number"}.get(
                key, f"comma-separated {'numbers' if PREPROCESS_LISTS.get(key) is float else 'integers'}")
            raise SplitExportError(f"--preprocess {key}: expected {what}, got {text!r}") from None
    return out


def given_preprocess(values: dict[str, object], manifest: Manifest,
                     fitted: PreprocessSpec | None = None) -> PreprocessSpec:
    """The transform of ``--preprocess`` (over the one fitted on ``--data``, if any), checked against the bundle."""
    from pydantic import ValidationError

    inp = manifest.segments[0].input
    shape = inp.sample_shape
    base: dict[str, object] = fitted.model_dump() if fitted is not None else {"kind": _default_kind(manifest)}
    merged = {**base, **values}
    kind = merged["kind"]
    if fitted is None and kind == "image" and len(shape) == 3:
        merged.setdefault("image_size", list(shape[1:]))
        if shape[0] in (1, 3):
            merged.setdefault("channel_order", "L" if shape[0] == 1 else "RGB")
    names = values.get("label_names")
    if manifest.loss.kind == "cross_entropy" and "num_classes" not in values and (fitted is None or names):
        merged["num_classes"] = len(names) if isinstance(names, list) and names else \
            manifest.segments[-1].output.sample_shape[0]
    try:
        spec = PreprocessSpec.model_validate(merged)
    except ValidationError as exc:
        msg = "; ".join("".join(f"{p}: " for p in e["loc"][:1]) + e["msg"].removeprefix("Value error, ")
                        for e in exc.errors())
        raise SplitExportError(f"--preprocess: {msg}") from None
    check_preprocess(spec, manifest)
    return spec


def _default_kind(manifest: Manifest) -> str:
    inp = manifest.segments[0].input
    if not inp.torch_dtype.is_floating_point:
        return "tokens"
    shape = inp.sample_shape
    return "image" if len(shape) == 3 and shape[0] in (1, 3) else "table" if len(shape) == 1 else "array"


def check_preprocess(spec: PreprocessSpec, manifest: Manifest) -> None:
    """One clear error when a transform cannot feed this bundle's input or label its output."""
    inp = manifest.segments[0].input
    shape = inp.sample_shape
    tokens = not inp.torch_dtype.is_floating_point
    if tokens != (spec.kind == "tokens"):
        raise SplitExportError(f"preprocess kind {spec.kind!r} does not fit the bundle's {inp.dtype} input" +
                               (" (token ids: kind tokens)" if tokens else " (kind tokens needs an int64/int32 input)"))
    if spec.kind == "tokens" and (spec.scale != 1 or spec.mean):
        raise SplitExportError("token ids are used unchanged: scale, mean and std do not apply to kind tokens")
    if spec.mean and len(spec.mean) not in (1, shape[0]):
        raise SplitExportError(f"preprocess mean/std have {len(spec.mean)} values, but the bundle's input "
                               f"{shape} has {shape[0]} channels along axis 1 (give {shape[0]}, or 1 for all)")
    if spec.kind == "image":
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise SplitExportError(f"preprocess kind image needs a bundle input of 1 or 3 x H x W, but it is {shape}")
        if spec.image_size is not None and tuple(spec.image_size) != shape[1:]:
            raise SplitExportError(f"preprocess image_size {spec.image_size} is not the bundle's input size "
                                   f"{list(shape[1:])} (H, W)")
        if spec.channel_order is not None and (spec.channel_order == "L") != (shape[0] == 1):
            raise SplitExportError(f"preprocess channel_order {spec.channel_order} does not fit the bundle's "
                                   f"{shape[0]}-channel input (L: 1, RGB: 3)")
    elif spec.image_size is not None or spec.channel_order is not None:
        raise SplitExportError(f"image_size and channel_order are for kind image, not {spec.kind}")
    if spec.feature_names and (spec.kind != "table" or len(shape) != 1 or len(spec.feature_names) != shape[0]):
        raise SplitExportError(f"preprocess feature_names ({len(spec.feature_names)}) are the columns of a table "
                               f"input, one per feature; the bundle's input is {shape} ({spec.kind})")
    out = manifest.segments[-1].output.sample_shape
    if manifest.loss.kind == "cross_entropy":
        if not 0 < spec.num_classes <= out[0]:
            raise SplitExportError(f"preprocess num_classes {spec.num_classes} does not fit the bundle's classifier "
                                   f"of {out[0]} outputs (1..{out[0]})")
    elif spec.num_classes or spec.label_names:
        raise SplitExportError("label_names and num_classes are for classifiers; this bundle's loss is mse")
