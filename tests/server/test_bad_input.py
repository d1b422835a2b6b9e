"""Every bad input gets a precise 4xx with a machine-readable error and leaves B unchanged."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import save

from tests._support import TOKEN, threaded_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ST = {**AUTH, "Content-Type": "application/vnd.safetensors"}


@pytest.fixture(scope="module")
def live(resnet_bundle: Path, tmp_path_factory):
    with threaded_server(resnet_bundle, tmp_path_factory.mktemp("state"), max_body_bytes=200_000) as srv:
        yield srv


def snapshot(state) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.segment.module.state_dict().items()}


def unchanged(state, before) -> bool:
    after = state.segment.module.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


def act(batch: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 16, 8, 8)).astype(np.float32)


@pytest.fixture
def session(live) -> str:
    url, _ = live
    return httpx.post(f"{url}/v1/sessions", headers=AUTH).json()["session_id"]


def post(url: str, path: str, body: bytes, headers=ST) -> httpx.Response:
    return httpx.post(url + path, content=body, headers=headers, timeout=30)


def nan_act() -> np.ndarray:
    a = act()
    a[0, 0, 0, 0] = np.nan
    return a


CASES = [
    ("wrong_shape", lambda: save({"activation": np.zeros((4, 16, 4, 4), np.float32)}), ST, 422),
    ("wrong_dtype", lambda: save({"activation": act().astype(np.float64)}), ST, 422),
    ("non_finite", lambda: save({"activation": nan_act()}), ST, 422),
    ("missing_tensor", lambda: save({"x": act()}), ST, 422),
    ("malformed_body", lambda: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", ST, 400),
    ("malformed_body", lambda: save({"activation": act()})[:-100], ST, 400),  # truncated
    ("body_too_large", lambda: save({"activation": act(64)}), ST, 413),
    ("unsupported_media_type", lambda: save({"activation": act()}), {**AUTH, "Content-Type": "application/json"}, 415),
    ("missing_token", lambda: save({"activation": act()}), {"Content-Type": "application/vnd.safetensors"}, 401),
    ("bad_token", lambda: save({"activation": act()}), {**ST, "Authorization": "Bearer nope"}, 401),
]


@pytest.mark.parametrize(("code", "make", "headers", "status"), CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_bad_forward_bodies(live, session, code, make, headers, status) -> None:
    url, state = live
    before = snapshot(state)
    r = post(url, f"/v1/sessions/{session}/steps/0/forward", make(), headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert unchanged(state, before)
    assert httpx.get(f"{url}/v1/sessions/{session}", headers=AUTH).json()["next_step"] == 0


def test_unknown_session_and_wrong_step(live, session) -> None:
    url, state = live
    before = snapshot(state)
    r = post(url, "/v1/sessions/nope/steps/0/forward", save({"activation": act()}))
    assert (r.status_code, r.json()["error"]["code"]) == (404, "unknown_session")
    r = post(url, f"/v1/sessions/{session}/steps/3/forward", save({"activation": act()}))
    assert r.status_code == 409
    assert r.json()["error"] | {} == r.json()["error"] and r.json()["error"]["next_step"] == 0
    r = post(url, f"/v1/sessions/{session}/steps/0/backward", save({"grad": act()[:, :, :4, :4].repeat(2, 1)}))
    assert (r.status_code, r.json()["error"]["expected"]) == (409, "forward")
    r = post(url, f"/v1/sessions/{session}/steps/0/train", save({"activation": act()}))
    assert (r.status_code, r.json()["error"]["code"]) == (400, "wrong_call")
    assert unchanged(state, before)


def test_repeated_calls_apply_once(live, session) -> None:
    url, state = live
    fwd = save({"activation": act()})
    r1 = post(url, f"/v1/sessions/{session}/steps/0/forward", fwd)
    r2 = post(url, f"/v1/sessions/{session}/steps/0/forward", fwd)  # retry: same bytes, B untouched
    assert r1.status_code == r2.status_code == 200 and r1.content == r2.content
    grad = save({"grad": np.full((4, 32, 4, 4), 1e-3, np.float32)})
    bad_grad = save({"grad": np.full((4, 32, 4, 4), np.inf, np.float32)})
    before = snapshot(state)
    r = post(url, f"/v1/sessions/{session}/steps/0/backward", bad_grad)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "non_finite")
    assert unchanged(state, before)
    steps = state.applied_steps
    b1 = post(url, f"/v1/sessions/{session}/steps/0/backward", grad)
    after_one = snapshot(state)
    b2 = post(url, f"/v1/sessions/{session}/steps/0/backward", grad)
    assert b1.status_code == b2.status_code == 200 and b1.content == b2.content
    assert state.applied_steps == steps + 1
    assert unchanged(state, after_one)
    other = save({"grad": np.full((4, 32, 4, 4), 2e-3, np.float32)})
    r = post(url, f"/v1/sessions/{session}/steps/0/backward", other)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "conflicting_retry")


def test_evaluate_changes_nothing_and_fp16_transport(live, session) -> None:
    url, state = live
    before = snapshot(state)
    r = post(url, f"/v1/sessions/{session}/evaluate", save({"activation": act().astype(np.float16)}))
    assert r.status_code == 200
    from safetensors.numpy import load

    out = load(r.content)["output"]
    assert out.dtype == np.float16 and out.shape == (4, 32, 4, 4)
    assert unchanged(state, before)


def test_nonloopback_without_tokens_is_refused(resnet_bundle: Path, tmp_path: Path) -> None:
    from server import ServerSettings, create_app

    with pytest.raises(ValueError, match="without bearer tokens"):
        create_app(ServerSettings(bundle=resnet_bundle, state_dir=tmp_path, host="0.0.0.0"))


def test_artifacts_by_hash_serve_device_files_only(live) -> None:
    url, state = live
    listing = httpx.get(f"{url}/v1/manifest", headers=AUTH).json()
    files = listing["device_files"]
    assert set(files) == {"torch/A.pt", "torch/C.pt"}
    r = httpx.get(f"{url}/v1/artifacts/{files['torch/A.pt']}", headers=AUTH)
    import hashlib

    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == files["torch/A.pt"]
    b_hash = state.bundle.manifest.files["torch/B.pt"]
    assert httpx.get(f"{url}/v1/artifacts/{b_hash}", headers=AUTH).status_code == 404
