"""Small bundles (the MLP, single and double split) and a server segment for strategy tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitexport import Bundle, OptimizerSpec, TorchSegment
from tests._support.bundles import SGD, build_bundle


def make_bundle(path: Path, cuts: list[str], optimizer: OptimizerSpec = SGD) -> Bundle:
    """The MLP cut at ``cuts``."""
    return build_bundle(path, "mlp", cuts, optimizer)


@pytest.fixture(scope="session")
def single_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("b") / "single", ["relu1"])


@pytest.fixture(scope="session")
def double_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("b") / "double", ["relu1", "relu2"])


def server_segment(bundle: Bundle, *, input_grad: bool = True, optimizer: OptimizerSpec = SGD) -> TorchSegment:
    return TorchSegment(bundle.torch_segment(bundle.manifest.server_segments[0].name), optimizer, input_grad=input_grad)


def client_batches(num: int, size: int = 8, features: int = 64, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per client: a random cut activation (the MLP's relu1 output) and labels."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"c{i}": (torch.rand(size, features, generator=gen), torch.randint(0, 10, (size,), generator=gen))
        for i in range(num)
    }
