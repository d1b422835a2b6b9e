"""The ``Server-Timing`` header of the tensor calls: where the server's time goes."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.numpy import save

from device_runtime import RemoteSegment, ServerClient
from tests._support import TOKEN, threaded_server


def test_tensor_calls_report_server_timing(mlp_bundle: Path, tmp_path: Path) -> None:
    with threaded_server(mlp_bundle, tmp_path / "state") as (url, _):
        client = ServerClient(url, TOKEN)
        remote = RemoteSegment(client)
        x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
        remote.forward(torch.from_numpy(x))
        forward = dict(client.server_timing)
        remote.train_with_gradient(torch.ones(8, 64))
        backward = dict(client.server_timing)
        raw = httpx.post(f"{url}/v1/sessions/{remote.session_id}/evaluate", content=save({"activation": x}),
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/vnd.safetensors"})
    assert set(forward) == {"decode", "b", "encode", "total"}
    assert set(backward) == {"decode", "b", "checkpoint", "encode", "total"}  # checkpoint_every=1
    for phases in (forward, backward):
        assert all(v >= 0 for v in phases.values())
        assert abs(sum(v for k, v in phases.items() if k != "total") - phases["total"]) < 0.01
    assert raw.headers["server-timing"].startswith("decode;dur=")
