"""Session-scoped example bundles for the server tests (built by :mod:`tests._support`, which the tests import
their servers and helpers from)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitexport import OptimizerSpec
from tests._support import make_bundle


@pytest.fixture(scope="session")
def resnet_bundle(tmp_path_factory) -> Path:
    opt = OptimizerSpec(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    return make_bundle(tmp_path_factory.mktemp("b") / "resnet", "resnet", ["layer1", "layer3"], opt)


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "mlp", "mlp", ["relu1", "relu2"], OptimizerSpec(lr=0.1, momentum=0.9))


@pytest.fixture(scope="session")
def mlp_single_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "mlp1", "mlp", ["relu1"], OptimizerSpec(lr=0.1, momentum=0.9))
