"""Server settings that change how the process runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from server import ServerSettings, create_app


def test_threads_setting_sets_torch_threads(mlp_bundle: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        create_app(ServerSettings(bundle=mlp_bundle, state_dir=tmp_path / "state", threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive(mlp_bundle: Path) -> None:
    with pytest.raises(ValidationError, match="threads"):
        ServerSettings(bundle=mlp_bundle, threads=0)
