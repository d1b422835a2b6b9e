"""The bundle manifest: a versioned, validated description of a partitioned model."""

from __future__ import annotations

import json
import math
from typing import Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._update_rule import LossKind

SCHEMA_VERSION: Final = 1
BATCH: Final = "batch"
"""The symbolic batch dimension in every tensor shape."""

OptimizerName = Literal["sgd", "adam", "adamw"]
TorchFormat = Literal["torchscript", "exported_program"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A tensor crossing a segment boundary; the first dimension is the symbolic batch."""

    name: str
    shape: list[int | Literal["batch"]]
    dtype: Literal["float32", "float16", "float64", "int64", "int32"] = "float32"
    """Element type: float32 activations; int64/int32 token ids for a first segment that embeds them."""

    @field_validator("shape")
    @classmethod
    def _batch_first(cls, shape: list[int | str]) -> list[int | str]:
        if not shape or shape[0] != BATCH or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
            raise ValueError(f"shape must be ['batch', positive ints...], got {shape}")
        return shape

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shape[1:])

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)  # type: ignore[no-any-return]


class OptimizerSpec(_Strict):
    """Optimizer settings shared by every segment (one optimizer per segment)."""

    name: OptimizerName = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

    def build(self, params: object) -> torch.optim.Optimizer:
        """The torch optimizer these settings describe."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)  # type: ignore[arg-type]
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)  # type: ignore[arg-type]
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)  # type: ignore[arg-type]


class LossSpec(_Strict):
    """The label loss of the last segment (mean-reduced)."""

    kind: LossKind = "cross_entropy"


class DefenceSpec(_Strict):
    """Privacy defences on the first segment A (docs/privacy.md, :mod:`splitexport.defence`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    nopeek: float = Field(0.0, ge=0)
    """Weight of NoPeek's distance correlation between A's input batch and its output in A's loss (0: off)."""
    activation_noise: float = Field(0.0, ge=0)
    """Std of the Gaussian noise added to A's output before it leaves the device, in training (0: off)."""

    @property
    def active(self) -> bool:
        return self.nopeek > 0 or self.activation_noise > 0


class SourceSpec(_Strict):
    """The model file the bundle was cut from."""

    file_name: str
    sha256: str
    kind: str
    arch: str | None = None


class PreprocessSpec(_Strict):
    """How raw samples become the bundle's input: ``x' = (x * scale - mean[c]) / std[c]``, c along axis 1.

    ``kind``: ``image`` (pixels 0..255 in ``channel_order``, resized to ``image_size`` = [H, W]), ``table``
    (CSV feature columns ``feature_names`` in order), ``array`` or ``tokens`` (used as given). Empty ``mean``
    and ``std`` mean no normalisation. ``label_names[i]`` names class ``i`` (empty for regression).
    """

    kind: Literal["image", "table", "array", "tokens"]
    scale: float = 1.0
    mean: list[float] = Field(default_factory=list)
    std: list[float] = Field(default_factory=list)
    image_size: list[int] | None = None
    channel_order: Literal["L", "RGB"] | None = None
    feature_names: list[str] = Field(default_factory=list)
    label_names: list[str] = Field(default_factory=list)
    num_classes: int = Field(0, ge=0)
    """0 for regression."""

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSpec:
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale must be a finite non-zero number, got {self.scale}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per channel each, got {len(self.mean)} and {len(self.std)}")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError("mean must be finite and std finite and positive")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) <= 0):
            raise ValueError(f"image_size is [H, W] with positive sizes, got {self.image_size}")
        if self.label_names and len(self.label_names) != self.num_classes:
            raise ValueError(f"{len(self.label_names)} label_names for num_classes {self.num_classes}")
        return self


class SegmentSpec(_Strict):
    """One segment: where it runs, what it takes and returns, and its files."""

    name: str
    index: int
    role: Literal["device", "server"]
    is_last: bool
    modules: list[str]
    input: TensorSpec
    output: TensorSpec
    parameters: int
    torch_file: str
    torch_format: TorchFormat
    artifacts: dict[str, dict[str, str]] = Field(default_factory=dict)
    """Per export format (``onnx``, ``tfjs``, ...): artifact kind -> path in the bundle."""

    @property
    def trains_with(self) -> Literal["labels", "gradient"]:
        return "labels" if self.is_last else "gradient"


class Manifest(_Strict):
    """``manifest.json`` of a bundle. ``files`` maps every bundle file to its sha256."""

    schema_version: Literal[1] = SCHEMA_VERSION
    scope: Literal["full", "device"] = "full"
    """``device``: a deployed copy holding only the device segments' files."""
    splitexport_version: str
    created: str
    source: SourceSpec
    cuts: list[str]
    split: Literal["single", "double", "multi"]
    loss: LossSpec = LossSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    defence: DefenceSpec = DefenceSpec()
    """Privacy defences of the first device segment (``partition --nopeek/--activation-noise``)."""
    segments: list[SegmentSpec]
    exports: dict[str, dict[str, object]] = Field(default_factory=dict)
    """Options each export format was produced with."""
    preprocess: PreprocessSpec | None = None
    """The transform from raw data to the first segment's input (``partition --data``); None: none recorded."""
    files: dict[str, str]

    def segment(self, name: str) -> SegmentSpec:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"bundle has no segment {name!r}; it has {[s.name for s in self.segments]}")

    @property
    def server_segments(self) -> list[SegmentSpec]:
        return [s for s in self.segments if s.role == "server"]

    @property
    def device_segments(self) -> list[SegmentSpec]:
        return [s for s in self.segments if s.role == "device"]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"


def manifest_json_schema() -> dict[str, object]:
    """The JSON schema of ``manifest.json`` (published in docs/bundle.md)."""
    return Manifest.model_json_schema()
