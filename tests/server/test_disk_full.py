"""Storage failures while a step is persisted (a full disk: 507; a state directory gone: 503): state unchanged,
lease released, recovery after."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import save

from device_runtime import RemoteSegment, ServerClient
from tests._support import TOKEN, threaded_server

ST = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/vnd.safetensors"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs (needs root); skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                            check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk``."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (b"\0" * 65536, b"\0"):
            try:
                while f.write(chunk):
                    pass
            except OSError:
                pass
    return filler


def _snapshot(state) -> dict[str, object]:  # type: ignore[no-untyped-def]
    seg = state.segment
    return {"b": {k: v.clone() for k, v in seg.module.state_dict().items()},
            "opt": [(k, v.clone()) for s in seg.optimizer.state.values() for k, v in s.items()],
            "applied": state.applied_steps, "counters": {s.id: (s.next_step, s.phase) for s in state.sessions.values()}}


def _same(a: dict, b: dict) -> bool:  # type: ignore[type-arg]
    return (a["applied"] == b["applied"] and a["counters"] == b["counters"]
            and all(torch.equal(a["b"][k], b["b"][k]) for k in a["b"])
            and len(a["opt"]) == len(b["opt"]) and all(torch.equal(x[1], y[1]) for x, y in zip(a["opt"], b["opt"])))


def _bodies() -> tuple[bytes, bytes]:
    """A forward body and a backward body for the MLP's middle segment (64 features, batch 8)."""
    rng = np.random.default_rng(0)
    return (save({"activation": rng.standard_normal((8, 64)).astype(np.float32)}),
            save({"grad": np.full((8, 64), 1e-2, dtype=np.float32)}))


def _stepped(url: str, steps: int) -> tuple[str, int, str]:
    """A session that took ``steps`` steps (its id and next step) and a second, fresh session."""
    remote = RemoteSegment(ServerClient(url, TOKEN))
    for _ in range(steps):
        remote.forward(torch.randn(8, 64))
        remote.train_with_gradient(torch.full((8, 64), 1e-2))
    other = httpx.post(f"{url}/v1/sessions", headers=ST).json()["session_id"]
    assert remote.session_id is not None
    return remote.session_id, remote.step, other


def test_full_disk_answers_507_and_changes_nothing(mlp_bundle: Path, small_disk: Path) -> None:
    state_dir = small_disk / "state"
    x, g = _bodies()
    with threaded_server(mlp_bundle, state_dir, checkpoint_every=3) as (url, state):
        sid, n, other = _stepped(url, 4)
        filler = _fill(small_disk)
        before = _snapshot(state)
        assert httpx.post(f"{url}/v1/sessions/{sid}/steps/{n}/forward", content=x, headers=ST).status_code == 200
        r = httpx.post(f"{url}/v1/sessions/{sid}/steps/{n}/backward", content=g, headers=ST)
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        assert _same(before, _snapshot(state)), "a failed step changed B, its optimizer or the counters"
        assert not list(state_dir.glob("*.tmp"))
        # the lease is released: another device gets B at once (not after the 30 s lease timeout)
        r = httpx.post(f"{url}/v1/sessions/{other}/steps/0/forward", content=x, headers=ST, timeout=5)
        assert r.status_code == 200
        r = httpx.post(f"{url}/v1/sessions/{other}/steps/0/backward", content=g, headers=ST)
        assert r.status_code == 507
        assert httpx.post(f"{url}/v1/sessions", headers=ST).status_code == 507  # opening a session needs disk too
        assert _same(before, _snapshot(state))
        filler.unlink()  # space returns: the same step goes through (forward first), no restart needed
        assert httpx.post(f"{url}/v1/sessions/{sid}/steps/{n}/forward", content=x, headers=ST).status_code == 200
        r = httpx.post(f"{url}/v1/sessions/{sid}/steps/{n}/backward", content=g, headers=ST)
        assert r.status_code == 200
        assert state.applied_steps == before["applied"] + 1  # type: ignore[operator]
        assert state.counters["storage_errors"] >= 3


def test_a_removed_state_directory_answers_503_and_changes_nothing(mlp_bundle: Path, tmp_path: Path) -> None:
    """The state directory is moved away while the server runs (an operator's mistake, a lost volume): SQLite would
    go on writing to its open, unlinked file and acknowledge steps no restart finds. Instead every write answers
    503 storage_unavailable with Retry-After, nothing changes, B's lease is released; with the directory back the
    same step goes through, and a restart finds every acknowledged step."""
    state_dir, away = tmp_path / "state", tmp_path / "moved"
    x, g = _bodies()
    with threaded_server(mlp_bundle, state_dir) as (url, state):
        sid, n, other = _stepped(url, 2)
        before = _snapshot(state)
        state_dir.rename(away)
        assert httpx.post(f"{url}/v1/sessions/{sid}/steps/{n}/forward", content=x, headers=ST).status_code == 200
        r = httpx.post(f"{url}/v1/sessions/{sid}/steps/{n}/backward", content=g, headers=ST)
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
        assert int(r.headers["retry-after"]) >= 1
        assert _same(before, _snapshot(state)), "a failed step changed B, its optimizer or the counters"
        r = httpx.post(f"{url}/v1/sessions/{other}/steps/0/forward", content=x, headers=ST, timeout=5)
        assert r.status_code == 200  # the lease was released
        r = httpx.post(f"{url}/v1/sessions/{other}/steps/0/backward", content=g, headers=ST)
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
        r = httpx.post(f"{url}/v1/sessions", headers=ST)
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
        assert _same(before, _snapshot(state)) and len(state.sessions) == 2
        away.rename(state_dir)  # the directory is back: the same step goes through (forward first)
        assert httpx.post(f"{url}/v1/sessions/{sid}/steps/{n}/forward", content=x, headers=ST).status_code == 200
        assert httpx.post(f"{url}/v1/sessions/{sid}/steps/{n}/backward", content=g, headers=ST).status_code == 200
        assert state.applied_steps == before["applied"] + 1  # type: ignore[operator]
        final = {k: v.clone() for k, v in state.segment.module.state_dict().items()}
    with threaded_server(mlp_bundle, state_dir) as (url, state):
        assert state.applied_steps == before["applied"] + 1  # type: ignore[operator]
        assert all(torch.equal(final[k], v) for k, v in state.segment.module.state_dict().items())
        assert httpx.get(f"{url}/v1/sessions/{sid}", headers=ST).json()["next_step"] == n + 1
