"""The training calls' lean path (``server._tensor_calls``) answers exactly what FastAPI's routes answer.

Two real servers on loopback from the same bundle: the app as built, and the same app with the lean path taken
out of its middleware stack (so FastAPI's routing and dependency resolution serve every call). The same sequence
of good and bad calls goes to both; status, error envelope or tensor bytes, media type, ``Retry-After`` and the
``Server-Timing`` phase names must match, and so must B's weights afterwards.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from safetensors.numpy import save

import server._tensor_calls as tensor_calls
from server import ServerState
from server._tensor_calls import TensorCalls
from tests._support import TOKEN, threaded_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ST = {**AUTH, "Content-Type": "application/vnd.safetensors"}


def _without_lean_path(app: FastAPI) -> None:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not TensorCalls]


def _calls(sid: str, shapes: dict[str, Any]) -> list[tuple[str, str, dict[str, str], bytes]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *shapes["input"])).astype(np.float32)
    g = (rng.standard_normal((4, *shapes["output"])) * 1e-2).astype(np.float32)
    fwd, bwd = save({"activation": x}), save({"grad": g})
    s = f"/v1/sessions/{sid}"
    return [
        ("POST", f"{s}/steps/0/forward", ST, fwd),
        ("POST", f"{s}/steps/0/forward", ST, fwd),                       # a retry: the stored response
        ("POST", f"{s}/steps/0/backward", ST, bwd),
        ("POST", f"{s}/steps/0/backward", ST, bwd),                      # a retry after the step
        ("POST", f"{s}/steps/5/forward", ST, fwd),                       # 409 wrong_step
        ("POST", f"{s}/steps/1/backward", ST, bwd),                      # 409 wrong_step (no forward yet)
        ("POST", f"{s}/steps/1/train", ST, fwd),                         # a double split has no train call
        ("POST", f"{s}/steps/1/forward", {**AUTH, "Content-Type": "text/plain"}, fwd),      # 415
        ("POST", f"{s}/steps/1/forward", ST, b"x" * (1 << 17)),         # 413 body_too_large
        ("POST", f"{s}/steps/1/forward", ST, b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"),  # 400
        ("POST", f"{s}/steps/1/forward", ST, save({"grad": g})),          # 422 missing tensor
        ("POST", f"{s}/steps/1/forward", {"Content-Type": "application/vnd.safetensors"}, fwd),  # 401
        ("POST", f"{s}/steps/1/forward", {**ST, "Authorization": "Basic abc"}, fwd),         # 401
        ("POST", "/v1/sessions/nope/steps/1/forward", ST, fwd),          # 404 unknown_session
        ("POST", f"{s}/steps/abc/forward", ST, fwd),                     # not a step number: FastAPI's 422
        ("POST", f"{s}/steps/-1/forward", ST, fwd),                      # FastAPI parses it; 409
        ("GET", f"{s}/steps/1/forward", AUTH, b""),                      # 405
        ("POST", f"{s}/evaluate", ST, fwd),
        ("POST", f"{s}/evaluate/", ST, fwd),                             # not the path: FastAPI's answer
        ("POST", f"{s}/steps/1/forward", ST, fwd),
        ("POST", f"{s}/steps/1/backward", ST, bwd),
    ]


def _run(url: str, state: ServerState) -> tuple[list[tuple[Any, ...]], dict[str, torch.Tensor]]:
    spec = state.spec
    shapes = {"input": spec.input.sample_shape, "output": spec.output.sample_shape}
    with httpx.Client(base_url=url, timeout=30, follow_redirects=False) as http:
        sid = http.post("/v1/sessions", headers=AUTH).raise_for_status().json()["session_id"]
        seen = []
        for method, path, headers, body in _calls(sid, shapes):
            r = http.request(method, path, headers=headers, content=body or None)
            timing = re.findall(r"([a-z_]+);dur=", r.headers.get("server-timing", ""))
            json_body = r.headers.get("content-type", "").startswith("application/json")
            content = json.loads(r.text.replace(sid, "SID")) if json_body else r.content
            seen.append((method, path.replace(sid, "SID"), r.status_code, content, r.headers.get("content-type"),
                         r.headers.get("retry-after"), timing))
    return seen, {k: v.clone() for k, v in state.segment.module.state_dict().items()}


def test_lean_path_answers_what_the_routes_answer(mlp_bundle: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    served = []
    read = tensor_calls.tensor_call

    async def counted(*args: Any) -> Any:
        served.append(args[1])
        return await read(*args)

    monkeypatch.setattr(tensor_calls, "tensor_call", counted)
    with threaded_server(mlp_bundle, tmp_path / "lean", max_body_bytes=1 << 16) as (url, state):
        lean, lean_b = _run(url, state)
    assert len(served) == 17  # every matching POST took the lean path
    with threaded_server(mlp_bundle, tmp_path / "routes", _without_lean_path, max_body_bytes=1 << 16) as (url, state):
        routes, routes_b = _run(url, state)
    assert len(served) == 17  # and none of the second server's
    for a, b in zip(lean, routes, strict=True):
        assert a == b, f"{a[:3]} answered differently: lean {a[3:]!r} vs routes {b[3:]!r}"
    statuses = [a[2] for a in lean]
    assert statuses[:4] == [200] * 4 and 415 in statuses and 413 in statuses and 401 in statuses
    assert lean_b.keys() == routes_b.keys()
    for k in lean_b:
        assert torch.equal(lean_b[k], routes_b[k]), k
