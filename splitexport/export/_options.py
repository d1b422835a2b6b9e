"""Typed options of :func:`splitexport.export.export`, one class per format.

The optimizer is always an :class:`~splitexport.OptimizerSpec` (``None``: the bundle's);
each format maps it onto what its runtime offers (ONNX Runtime: plain SGD or AdamW).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._errors import ExportError
from .._manifest import OptimizerSpec

__all__ = ["ExportOptions", "Format", "OnnxOptions", "TfjsOptions", "TfliteOptions", "optimizer_spec"]

Format = Literal["onnx", "tfjs", "tflite"]
TfliteVariant = Literal["flex", "builtin"]


@dataclass(frozen=True)
class OnnxOptions:
    """ONNX Runtime training artifacts: ``opset`` 15..20, ``batch_size`` None = dynamic, ``ort_format`` also
    writes ``.ort`` copies. ``optimizer`` must map onto ONNX Runtime's plain SGD or AdamW."""

    optimizer: OptimizerSpec | None = None
    opset: int = 17
    batch_size: int | None = None
    ort_format: bool = False


@dataclass(frozen=True)
class TfjsOptions:
    """TF.js layers models; the JS runtime trains with ``optimizer`` (torch.optim semantics)."""

    optimizer: OptimizerSpec | None = None


@dataclass(frozen=True)
class TfliteOptions:
    """TFLite training models: the ``variants`` to write, and the fixed batch size of the builtin variant."""

    optimizer: OptimizerSpec | None = None
    variants: tuple[TfliteVariant, ...] = ("flex", "builtin")
    batch_size: int = 32


ExportOptions = OnnxOptions | TfjsOptions | TfliteOptions


def optimizer_spec(opt: OptimizerSpec | Mapping[str, Any] | None) -> OptimizerSpec:
    """``opt`` as an :class:`OptimizerSpec` (a mapping is validated; ``None`` is the default SGD)."""
    if isinstance(opt, OptimizerSpec):
        return opt
    o = dict(opt or {})
    if o.get("name", "sgd") not in ("sgd", "adam", "adamw"):
        raise ExportError(f"unknown optimizer {o['name']!r}; expected sgd, adam or adamw")
    try:
        return OptimizerSpec.model_validate(o)
    except ValueError as exc:
        raise ExportError(f"invalid optimizer settings: {exc}") from exc
