"""Server settings that change how the process runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from server import ServerSettings, create_app
from tests._support import ServerProcess


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


@pytest.mark.parametrize(("flags", "pragma"), [((), "FULL"), (("--sync", "normal"), "NORMAL")])
def test_serve_sync_flag_reaches_the_store(mlp_bundle: Path, tmp_path: Path, flags: tuple[str, ...],
                                           pragma: str) -> None:
    """``splitexport serve --sync normal`` (a real CLI process) opens state.db with ``synchronous=NORMAL``; without
    the flag, ``FULL``. Seen in the start log line, which names the pragma as the store's SQLite connection reports
    it (a per-connection setting: another connection to the file cannot see it)."""
    server = ServerProcess(mlp_bundle, tmp_path / "state", None, *flags, stderr_dir=tmp_path)
    server.start()
    err = server.stop()
    start = [line for line in err.splitlines() if "fresh start in" in line]
    assert len(start) == 1 and start[0].endswith(f"(synchronous={pragma})"), err
