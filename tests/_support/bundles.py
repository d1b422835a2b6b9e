"""Bundles of the example models, written with a fixed seed (so two builds hold the same weights)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from splitexport import Bundle, OptimizerSpec, SourceSpec, partition, write_bundle
from splitexport.models import FACTORIES

SGD = OptimizerSpec(name="sgd", lr=0.05)
ALIASES = {"resnet": "resnet_cnn", "mobilenet": "mobilenet_cnn"}


def build_bundle(path: Path, model: str | Callable[[], torch.nn.Module], cuts: Sequence[str],
                 optimizer: OptimizerSpec = SGD, *, sample_shape: Sequence[int] = (1, 8, 8)) -> Bundle:
    """Partition ``model`` (a name in :data:`splitexport.models.FACTORIES`, ``resnet``/``mobilenet`` for short,
    or a factory) at ``cuts`` after ``torch.manual_seed(0)`` and write the bundle to ``path``."""
    torch.manual_seed(0)
    name = ALIASES.get(model, model) if isinstance(model, str) else getattr(model, "__name__", "model")
    factory = FACTORIES[name] if isinstance(model, str) else model
    part = partition(factory(), list(cuts), torch.zeros(2, *sample_shape))
    source = SourceSpec(file_name=f"{name}.pt", sha256="0" * 64, kind="state_dict")
    return write_bundle(part, path, source=source, optimizer=optimizer)


def make_bundle(path: Path, model: str, cuts: list[str], opt: OptimizerSpec) -> Path:
    """:func:`build_bundle`, answering the bundle's path (the server tests' form)."""
    return build_bundle(path, model, cuts, opt).path
