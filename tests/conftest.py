"""Shared fixtures: the digits dataset and small example models."""

from __future__ import annotations

import pytest
import torch

from splitexport import Dataset, load_dataset


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture
def example_input() -> torch.Tensor:
    return torch.zeros(2, 1, 8, 8)
