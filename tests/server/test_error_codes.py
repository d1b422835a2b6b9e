"""Every documented error code over real HTTP: its status, its code, and B left exactly as it was.

"B" here is everything a refused call must not touch: the weights and BatchNorm statistics, the optimizer
state, the server's applied-step counter and every session's step counter. A second token checks session
ownership. (tests/server/test_bad_input.py covers the body checks of the forward call; docs/protocol.md
lists which test covers which code.)
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import torch
import uvicorn
from safetensors.numpy import load, save
from safetensors.torch import save as torch_save

from server import ServerSettings, create_app
from server._scheduler import LeaseScheduler
from splitexport import LossSpec, OptimizerSpec, SourceSpec, partition, write_bundle
from splitexport.models import mlp
from splitexport.protocol import MAX_HEADER_BYTES, MAX_TENSORS, ErrorCode
from tests._support import TOKEN, free_port, threaded_server

TOKEN2 = "second-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AUTH2 = {"Authorization": f"Bearer {TOKEN2}"}
ST = {**AUTH, "Content-Type": "application/vnd.safetensors"}
ST2 = {**AUTH2, "Content-Type": "application/vnd.safetensors"}


# -- B's state, compared exactly ---------------------------------------------------------------------------

def b_state(url: str, state: Any, sessions: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Weights and BatchNorm statistics, optimizer state, applied steps, and each session's counters."""
    segment = state.segment
    return {
        "module": {k: v.clone() for k, v in segment.module.state_dict().items()},
        "optimizer": _clone(segment.optimizer.state_dict()),
        "steps_applied": httpx.get(f"{url}/healthz").json()["steps_applied"],
        "sessions": {sid: httpx.get(f"{url}/v1/sessions/{sid}", headers=h).json() for sid, h in sessions.items()},
    }


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clone(v) for v in x]
    return x


def same(a: Any, b: Any) -> bool:
    """Exact equality, tensors included (NaN is never equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def refused(r: httpx.Response, code: ErrorCode) -> dict[str, Any]:
    """The response is ``code`` with its documented status and the envelope; returns ``error``."""
    assert r.status_code == code.status, r.text
    error = r.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["message"], error
    return error  # type: ignore[no-any-return]


def post(url: str, path: str, body: bytes, headers: dict[str, str] = ST) -> httpx.Response:
    return httpx.post(url + path, content=body, headers=headers, timeout=30)


def act(batch: int = 4, shape: tuple[int, ...] = (16, 8, 8)) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)


def open_session(url: str, auth: dict[str, str] = AUTH) -> str:
    return str(httpx.post(f"{url}/v1/sessions", headers=auth).json()["session_id"])


# -- a BatchNorm model, double split, two tokens --------------------------------------------------------------

@pytest.fixture(scope="module")
def live(resnet_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, str]]:
    """The ResNet (BatchNorm in B) with one step applied, so B's optimizer has state to protect."""
    tmp = tmp_path_factory.mktemp("codes")
    (tmp / "tokens").write_text(f"# the second device owner\n{TOKEN2}\n")
    with threaded_server(resnet_bundle, tmp / "state", tokens_file=tmp / "tokens", max_batch=8,
                         body_timeout_s=1.0) as (url, state):
        warm = open_session(url)
        assert post(url, f"/v1/sessions/{warm}/steps/0/forward", save({"activation": act()})).status_code == 200
        grad = save({"grad": np.full((4, 32, 4, 4), 1e-3, np.float32)})
        assert post(url, f"/v1/sessions/{warm}/steps/0/backward", grad).status_code == 200
        assert state.segment.optimizer.state_dict()["state"], "B's optimizer has momentum buffers"
        yield url, state, warm


@pytest.fixture
def sid(live: tuple[str, Any, str]) -> str:
    return open_session(live[0])


def test_empty_body(live, sid) -> None:
    url, state, warm = live
    before = b_state(url, state, {sid: AUTH, warm: AUTH})
    refused(post(url, f"/v1/sessions/{sid}/steps/0/forward", b""), ErrorCode.EMPTY_BODY)
    assert same(b_state(url, state, {sid: AUTH, warm: AUTH}), before)


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Token abc"])
def test_bad_authorization(live, sid, header: str) -> None:
    url, state, _warm = live
    before = b_state(url, state, {sid: AUTH})
    r = post(url, f"/v1/sessions/{sid}/steps/0/forward", save({"activation": act()}),
             {"Authorization": header, "Content-Type": "application/vnd.safetensors"})
    refused(r, ErrorCode.BAD_AUTHORIZATION)
    assert same(b_state(url, state, {sid: AUTH}), before)


def test_not_your_session(live, sid) -> None:
    """A second token can neither read, step, nor delete the first token's session, nor break its lease."""
    url, state, warm = live
    before = b_state(url, state, {sid: AUTH, warm: AUTH})
    body = save({"activation": act()})
    refused(post(url, f"/v1/sessions/{sid}/steps/0/forward", body, ST2), ErrorCode.NOT_YOUR_SESSION)
    refused(httpx.get(f"{url}/v1/sessions/{sid}", headers=AUTH2), ErrorCode.NOT_YOUR_SESSION)
    refused(httpx.delete(f"{url}/v1/sessions/{sid}", headers=AUTH2), ErrorCode.NOT_YOUR_SESSION)
    refused(post(url, f"/v1/sessions/{sid}/evaluate", body, ST2), ErrorCode.NOT_YOUR_SESSION)
    assert same(b_state(url, state, {sid: AUTH, warm: AUTH}), before)
    # mid-step: the owner holds B after its forward; the other token's backward changes nothing
    assert post(url, f"/v1/sessions/{sid}/steps/0/forward", body).status_code == 200
    mid = b_state(url, state, {sid: AUTH})
    grad = save({"grad": np.full((4, 32, 4, 4), 1e-3, np.float32)})
    refused(post(url, f"/v1/sessions/{sid}/steps/0/backward", grad, ST2), ErrorCode.NOT_YOUR_SESSION)
    assert same(b_state(url, state, {sid: AUTH}), mid)
    assert post(url, f"/v1/sessions/{sid}/steps/0/backward", grad).status_code == 200  # the owner's step goes on
    assert httpx.get(f"{url}/v1/sessions/{sid}", headers=AUTH).json()["next_step"] == 1
    other = open_session(url, AUTH2)  # and the second token's own session works
    assert httpx.get(f"{url}/v1/sessions/{other}", headers=AUTH2).status_code == 200


def test_wrong_batch(live, sid) -> None:
    url, state, _warm = live
    before = b_state(url, state, {sid: AUTH})
    refused(post(url, f"/v1/sessions/{sid}/steps/0/forward", save({"activation": act(9)})),  # max_batch=8
            ErrorCode.WRONG_BATCH)
    assert same(b_state(url, state, {sid: AUTH}), before)
    assert post(url, f"/v1/sessions/{sid}/steps/0/forward", save({"activation": act(4)})).status_code == 200
    mid = b_state(url, state, {sid: AUTH})
    short = save({"grad": np.full((2, 32, 4, 4), 1e-3, np.float32)})  # the forward had batch 4
    refused(post(url, f"/v1/sessions/{sid}/steps/0/backward", short), ErrorCode.WRONG_BATCH)
    assert same(b_state(url, state, {sid: AUTH}), mid)
    grad = save({"grad": np.full((4, 32, 4, 4), 1e-3, np.float32)})
    assert post(url, f"/v1/sessions/{sid}/steps/0/backward", grad).status_code == 200  # the step is still whole


def test_unknown_artifact(live) -> None:
    url, state, _ = live
    refused(httpx.get(f"{url}/v1/artifacts/{'0' * 64}", headers=AUTH), ErrorCode.UNKNOWN_ARTIFACT)
    b_hash = state.bundle.manifest.files["torch/B.pt"]  # server-only files are never served
    refused(httpx.get(f"{url}/v1/artifacts/{b_hash}", headers=AUTH), ErrorCode.UNKNOWN_ARTIFACT)
    refused(httpx.get(f"{url}/v1/artifacts/..%2F..%2Fmanifest.json", headers=AUTH), ErrorCode.NOT_FOUND)


def test_unknown_routes_and_methods_answer_the_envelope(live) -> None:
    url, _, _ = live
    refused(httpx.get(f"{url}/v1/nope", headers=AUTH), ErrorCode.NOT_FOUND)
    refused(httpx.get(f"{url}/v2/sessions", headers=AUTH), ErrorCode.NOT_FOUND)
    refused(httpx.delete(f"{url}/v1/manifest", headers=AUTH), ErrorCode.METHOD_NOT_ALLOWED)
    refused(httpx.get(f"{url}/v1/sessions/x/steps/0/forward", headers=AUTH), ErrorCode.METHOD_NOT_ALLOWED)
    refused(httpx.get(f"{url}/v1/strategy", headers=AUTH), ErrorCode.NO_STRATEGY)
    doc = httpx.get(f"{url}/openapi.json").json()  # the document that lists these (tests/device_runtime)
    assert "Error" in doc["components"]["schemas"]


def _header_only(header: dict[str, Any], claimed: int | None = None) -> bytes:
    data = json.dumps(header).encode()
    return struct.pack("<Q", len(data) if claimed is None else claimed) + data


def test_header_size_and_tensor_count_are_bounded_before_parsing(live, sid) -> None:
    """The 150,000-empty-tensor header (9 MiB) that stalled the server, and 5,000 tensors in a small one."""
    url, state, _warm = live
    before = b_state(url, state, {sid: AUTH})
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    huge = _header_only({f"t{i}": empty for i in range(150_000)})
    assert len(huge) > 8 * 2**20
    t0 = time.perf_counter()
    error = refused(post(url, f"/v1/sessions/{sid}/steps/0/forward", huge), ErrorCode.HEADER_TOO_LARGE)
    elapsed = time.perf_counter() - t0
    assert error["limit"] == MAX_HEADER_BYTES
    many = _header_only({f"t{i}": empty for i in range(MAX_TENSORS + 1)})
    assert len(many) < MAX_HEADER_BYTES
    error = refused(post(url, f"/v1/sessions/{sid}/steps/0/forward", many), ErrorCode.HEADER_TOO_LARGE)
    assert error["limit"] == MAX_TENSORS
    # a header length beyond the body itself is malformed, not a reason to wait or allocate
    refused(post(url, f"/v1/sessions/{sid}/steps/0/forward", _header_only({}, claimed=2**20)), ErrorCode.MALFORMED_BODY)
    print(f"9 MiB safetensors header refused in {elapsed * 1000:.0f} ms (round trip)")
    assert same(b_state(url, state, {sid: AUTH}), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float64,
                                   torch.uint8, torch.int8, torch.bool])
def test_every_other_dtype_is_wrong_dtype(live, sid, dtype: torch.dtype) -> None:
    url, state, _warm = live
    before = b_state(url, state, {sid: AUTH})
    body = torch_save({"activation": torch.from_numpy(act()).to(dtype)})
    error = refused(post(url, f"/v1/sessions/{sid}/steps/0/forward", body), ErrorCode.WRONG_DTYPE)
    assert error["tensor"] == "activation"
    assert same(b_state(url, state, {sid: AUTH}), before)


def _raw_http(url: str, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(data)
        s.settimeout(timeout)
        t0, out = time.monotonic(), b""
        while chunk := s.recv(65536):
            out += chunk
        return out, time.monotonic() - t0


def test_slow_body_gets_body_timeout(live, sid) -> None:
    """A body that stops arriving is answered 408 after ``body_timeout_s`` (1 s here); others go on meanwhile."""
    url, state, _warm = live
    before = b_state(url, state, {sid: AUTH})
    body = save({"activation": act()})
    head = (f"POST /v1/sessions/{sid}/steps/0/forward HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/vnd.safetensors\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    result: dict[str, Any] = {}
    slow = threading.Thread(target=lambda: result.update(r=_raw_http(url, head + body[:100])))
    slow.start()
    time.sleep(0.2)
    assert httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200  # the slow body holds nothing up
    slow.join()
    raw, elapsed = result["r"]
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), raw[:200]
    assert b"connection: close" in rest.lower()
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == ErrorCode.BODY_TIMEOUT and ErrorCode.BODY_TIMEOUT.status == 408
    assert 0.9 <= elapsed <= 5, elapsed
    assert same(b_state(url, state, {sid: AUTH}), before)
    assert post(url, f"/v1/sessions/{sid}/steps/0/forward", body).status_code == 200  # the session is usable


def test_truncated_body(resnet_bundle: Path, tmp_path: Path) -> None:
    """A body shorter than its Content-Length: uvicorn never delivers one (the client waits, then gets 408, or
    closes the connection), so the app is called as an ASGI server that does deliver it would call it."""
    app = create_app(ServerSettings(bundle=resnet_bundle, state_dir=tmp_path / "state", tokens=TOKEN))
    state = app.state.server
    sid = anyio.run(state.open_session, state.check_token(TOKEN)).id
    before = {k: v.clone() for k, v in state.segment.module.state_dict().items()}
    body = save({"activation": act()})
    sent: list[MutableMapping[str, Any]] = []

    async def call() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": f"/v1/sessions/{sid}/steps/0/forward", "raw_path": b"", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"authorization", f"Bearer {TOKEN}".encode()),
                             (b"content-type", b"application/vnd.safetensors"),
                             (b"content-length", str(len(body)).encode())]}
        messages = iter([{"type": "http.request", "body": body[:-100], "more_body": False}])

        async def receive() -> MutableMapping[str, Any]:
            return next(messages, {"type": "http.disconnect"})

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)

    anyio.run(call)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["code"] == ErrorCode.TRUNCATED_BODY
    after = state.segment.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert state.session(sid, state.check_token(TOKEN)).public()["next_step"] == 0


@contextmanager
def serve(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_crash_answers_internal_error_in_the_envelope(mlp_bundle: Path, tmp_path: Path) -> None:
    """An unexpected exception in a route (a bug) is a 500 ``internal_error`` envelope, not plain text."""
    app = create_app(ServerSettings(bundle=mlp_bundle, state_dir=tmp_path / "state", tokens=TOKEN))

    def crash() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/crash", crash)
    with serve(app) as url:
        r = httpx.get(f"{url}/crash")
        error = refused(r, ErrorCode.INTERNAL_ERROR)
        assert "a bug" not in error["message"]  # no internals leak
        assert httpx.get(f"{url}/healthz").status_code == 200


# -- the lease on B: a real 503 busy, and a lost forward ------------------------------------------------------

def test_busy_and_forward_lost(mlp_bundle: Path, tmp_path: Path) -> None:
    """Device X holds B past the lease (1 s); of two devices waiting for B one takes it over, the other is
    told 503 busy (with Retry-After) when its own wait runs out; X's late backward is a 409 that expects the
    forward of the same step again (today ``wrong_step``; ``forward_lost`` says the same, docs/protocol.md)."""
    with threaded_server(mlp_bundle, tmp_path / "state", lease_timeout_s=1.0) as (url, state):
        x, y1, y2 = (open_session(url) for _ in range(3))
        everyone = {s: AUTH for s in (x, y1, y2)}
        spec = state.spec
        a = np.random.default_rng(0).standard_normal((4, *spec.input.sample_shape)).astype(np.float32)
        grad = save({"grad": np.full((4, *spec.output.sample_shape), 1e-3, np.float32)})
        assert post(url, f"/v1/sessions/{x}/steps/0/forward", save({"activation": a})).status_code == 200
        before = b_state(url, state, everyone)
        replies: dict[str, httpx.Response] = {}

        def forward(s: str) -> None:
            replies[s] = post(url, f"/v1/sessions/{s}/steps/0/forward", save({"activation": a}))

        waiting = [threading.Thread(target=forward, args=(s,)) for s in (y1, y2)]
        for t in waiting:
            t.start()
            time.sleep(0.1)
        for t in waiting:
            t.join()
        statuses = sorted(r.status_code for r in replies.values())
        assert statuses == [200, 503], {s: r.text for s, r in replies.items()}
        winner, loser = (y1, y2) if replies[y1].status_code == 200 else (y2, y1)
        refused(replies[loser], ErrorCode.BUSY)
        assert float(replies[loser].headers["retry-after"]) >= 1
        late = post(url, f"/v1/sessions/{x}/steps/0/backward", grad)  # the lost forward: resend it, then this
        error = late.json()["error"]
        assert late.status_code == 409 and error["code"] in (ErrorCode.WRONG_STEP, ErrorCode.FORWARD_LOST), late.text
        assert (error["next_step"], error["expected"]) == (0, "forward")
        after = b_state(url, state, everyone)
        assert same(after["module"], before["module"]) and same(after["optimizer"], before["optimizer"])
        assert after["steps_applied"] == before["steps_applied"]
        assert after["sessions"][loser] == before["sessions"][loser]  # nothing of the busy call stayed
        assert after["sessions"][x]["expected"] == "forward" and after["sessions"][x]["next_step"] == 0
        assert post(url, f"/v1/sessions/{winner}/steps/0/backward", grad).status_code == 200


def test_closing_a_session_that_waits_for_b_releases_its_place(mlp_bundle: Path, tmp_path: Path) -> None:
    """Device Y's forward waits for B (X holds it) when Y's session is deleted: Y's call answers 404
    unknown_session at once, and when X's step ends B goes to the next device Z without delay (before, the
    lease went to the closed session, whose backward never comes: Z waited the whole ``lease_timeout_s``)."""
    with threaded_server(mlp_bundle, tmp_path / "state", lease_timeout_s=20.0) as (url, state):
        x, y, z = (open_session(url) for _ in range(3))
        spec = state.spec
        a = save({"activation": np.random.default_rng(0).standard_normal((4, *spec.input.sample_shape))
                  .astype(np.float32)})
        grad = save({"grad": np.full((4, *spec.output.sample_shape), 1e-3, np.float32)})
        assert post(url, f"/v1/sessions/{x}/steps/0/forward", a).status_code == 200
        before = b_state(url, state, {x: AUTH, z: AUTH})
        waiting: dict[str, Any] = {}

        def forward_y() -> None:
            waiting["r"] = post(url, f"/v1/sessions/{y}/steps/0/forward", a)
            waiting["t"] = time.monotonic()

        thread = threading.Thread(target=forward_y)
        thread.start()
        deadline = time.monotonic() + 10
        assert isinstance(state.scheduler, LeaseScheduler)
        lease = state.scheduler.lease
        while lease.waiting == 0:  # Y waits in line for B
            assert time.monotonic() < deadline and thread.is_alive(), "Y's forward never waited for B"
            time.sleep(0.01)
        t0 = time.monotonic()
        assert httpx.delete(f"{url}/v1/sessions/{y}", headers=AUTH).status_code == 204
        thread.join(timeout=10)
        error = refused(waiting["r"], ErrorCode.UNKNOWN_SESSION)
        assert "closed" in error["message"] and waiting["t"] - t0 < 2.0
        assert lease.waiting == 0 and lease.holder == x
        assert same(b_state(url, state, {x: AUTH, z: AUTH}), before)  # Y left no trace in B
        assert post(url, f"/v1/sessions/{x}/steps/0/backward", grad).status_code == 200
        t1 = time.monotonic()
        r = post(url, f"/v1/sessions/{z}/steps/0/forward", a)
        assert r.status_code == 200 and time.monotonic() - t1 < 2.0, (r.text, time.monotonic() - t1)
        assert lease.holder == z
        assert post(url, f"/v1/sessions/{z}/steps/0/backward", grad).status_code == 200
        assert httpx.get(f"{url}/healthz").json()["steps_applied"] == 2
        refused(httpx.get(f"{url}/v1/sessions/{y}", headers=AUTH), ErrorCode.UNKNOWN_SESSION)


# -- updates that would break B: non-finite results, a gradient-norm limit -------------------------------------

def _logged(state: Any) -> int:
    return len(state.store.log(0))


def test_a_finite_huge_gradient_is_refused_and_rolled_back(live, sid) -> None:
    """A finite 3e38 gradient overflows B's weights: 422 non_finite_update, and B (weights, BatchNorm statistics,
    optimizer state), the counters and the step log stay as they were; the same step then trains normally."""
    url, state, warm = live
    small, huge = (save({"grad": np.full((4, 32, 4, 4), v, np.float32)}) for v in (1e-3, 3e38))
    # one whole step first: B is then free (an earlier test's forward may have held it)
    assert post(url, f"/v1/sessions/{sid}/steps/0/forward", save({"activation": act()})).status_code == 200
    assert post(url, f"/v1/sessions/{sid}/steps/0/backward", small).status_code == 200
    before, logged = b_state(url, state, {sid: AUTH, warm: AUTH}), _logged(state)
    assert post(url, f"/v1/sessions/{sid}/steps/1/forward", save({"activation": act()})).status_code == 200
    refused(post(url, f"/v1/sessions/{sid}/steps/1/backward", huge), ErrorCode.NON_FINITE_UPDATE)
    # as before the forward: the refused step's BatchNorm update is undone too, the session expects the forward
    assert same(b_state(url, state, {sid: AUTH, warm: AUTH}), before) and _logged(state) == logged
    assert all(torch.isfinite(v).all() for v in state.segment.module.state_dict().values() if v.is_floating_point())
    assert post(url, f"/v1/sessions/{sid}/steps/1/forward", save({"activation": act()})).status_code == 200
    ok = post(url, f"/v1/sessions/{sid}/steps/1/backward", small)
    assert ok.status_code == 200, ok.text
    assert _logged(state) == logged + 1


def test_gradient_norm_limit(mlp_bundle: Path, tmp_path: Path) -> None:
    """``max_grad_norm``: a step whose gradient norm is above it is 422 gradient_too_large and changes nothing;
    one below it trains."""
    with threaded_server(mlp_bundle, tmp_path / "state", max_grad_norm=1.0) as (url, state):
        sid = open_session(url)
        spec = state.spec
        a = save({"activation": np.random.default_rng(0).standard_normal((4, *spec.input.sample_shape))
                  .astype(np.float32)})
        out_shape = (4, *spec.output.sample_shape)
        assert post(url, f"/v1/sessions/{sid}/steps/0/forward", a).status_code == 200
        before, logged = b_state(url, state, {sid: AUTH}), _logged(state)
        error = refused(post(url, f"/v1/sessions/{sid}/steps/0/backward", save({"grad": np.full(out_shape, 10.0,
                                                                                                np.float32)})),
                        ErrorCode.GRADIENT_TOO_LARGE)
        assert "max_grad_norm=1" in error["message"]
        after = b_state(url, state, {sid: AUTH})
        assert same(after["module"], before["module"]) and same(after["optimizer"], before["optimizer"])
        assert after["steps_applied"] == before["steps_applied"] and _logged(state) == logged
        assert post(url, f"/v1/sessions/{sid}/steps/0/forward", a).status_code == 200
        small = save({"grad": np.full(out_shape, 1e-4, np.float32)})
        assert post(url, f"/v1/sessions/{sid}/steps/0/backward", small).status_code == 200
        assert not same(b_state(url, state, {sid: AUTH})["module"], before["module"])


# -- caps on sessions ------------------------------------------------------------------------------------------

def test_too_many_sessions(mlp_bundle: Path, tmp_path: Path) -> None:
    """A token may hold ``max_sessions_per_token`` open sessions, the server ``max_sessions``: beyond either,
    429 too_many_sessions and no session is made; closing one makes room again."""
    (tmp_path / "tokens").write_text(f"{TOKEN2}\n")
    with threaded_server(mlp_bundle, tmp_path / "state", tokens_file=tmp_path / "tokens", max_sessions_per_token=2,
                         max_sessions=3) as (url, state):
        first = [open_session(url) for _ in range(2)]
        before = b_state(url, state, dict.fromkeys(first, AUTH))
        error = refused(httpx.post(f"{url}/v1/sessions", headers=AUTH), ErrorCode.TOO_MANY_SESSIONS)
        assert error["limit"] == 2 and "this token" in error["message"]
        other = open_session(url, AUTH2)  # another token still may, up to the total
        error = refused(httpx.post(f"{url}/v1/sessions", headers=AUTH2), ErrorCode.TOO_MANY_SESSIONS)
        assert error["limit"] == 3 and "server" in error["message"]
        assert same(b_state(url, state, dict.fromkeys(first, AUTH)), before)
        assert len(state.sessions) == 3 and len(state.store.sessions()) == 3
        assert httpx.delete(f"{url}/v1/sessions/{first[0]}", headers=AUTH).status_code == 204
        assert open_session(url) not in (*first, other)


# -- opening a session is safe to retry -------------------------------------------------------------------------

class _LoseFirstReply(httpx.BaseTransport):
    """Real HTTP, but the first ``POST /v1/sessions`` reply is lost after the server handled the request."""

    def __init__(self) -> None:
        self.inner, self.lost = httpx.HTTPTransport(), 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/sessions" and not self.lost:
            response.read()
            self.lost += 1
            raise httpx.ReadError("connection reset (the test lost the reply)", request=request)
        return response


def test_idempotency_key_makes_opening_a_session_safe_to_retry(mlp_bundle: Path, tmp_path: Path) -> None:
    """The same ``Idempotency-Key`` and token answer the same open session, across a restart too; another token
    or key opens another; a closed session's key opens a new one. The Python client's retried open (its first
    reply lost) leaves no orphan session."""
    from device_runtime._client import ServerClient

    (tmp_path / "tokens").write_text(f"{TOKEN2}\n")
    kw: dict[str, Any] = {"tokens_file": tmp_path / "tokens"}

    def opened(url: str, key: str, auth: dict[str, str] = AUTH) -> str:
        r = httpx.post(f"{url}/v1/sessions", headers={**auth, "Idempotency-Key": key})
        assert r.status_code == 201, r.text
        return str(r.json()["session_id"])

    with threaded_server(mlp_bundle, tmp_path / "state", **kw) as (url, state):
        first = opened(url, "k1")
        assert opened(url, "k1") == first and len(state.sessions) == 1 and len(state.store.sessions()) == 1
        assert opened(url, "k1", AUTH2) != first  # keys are per token
        second = opened(url, "k2")
        assert second != first
        refused(httpx.post(f"{url}/v1/sessions", headers={**AUTH, "Idempotency-Key": "x" * 256}),
                ErrorCode.INVALID_REQUEST)
        assert len(state.sessions) == 3
        assert httpx.delete(f"{url}/v1/sessions/{second}", headers=AUTH).status_code == 204
        assert opened(url, "k2") != second
        lossy = _LoseFirstReply()
        client = ServerClient(url, TOKEN, transport=lossy, backoff_s=0.01)
        try:
            count = len(state.sessions)
            retried = client.open_session()["session_id"]
            assert lossy.lost == 1 and client.retries == 1
            assert len(state.sessions) == count + 1 and retried in state.sessions  # no orphan
        finally:
            client.close()
    with threaded_server(mlp_bundle, tmp_path / "state", **kw) as (url, state):  # durable in the store
        assert opened(url, "k1") == first and len(state.sessions) == 4


# -- wrong tokens are rate limited per address --------------------------------------------------------------

def test_too_many_wrong_tokens(mlp_bundle: Path, tmp_path: Path) -> None:
    """After ``bad_token_burst`` wrong tokens from one address, the next is 429 too_many_attempts with
    Retry-After, while the valid token from the same address still works; the allowance refills."""
    with threaded_server(mlp_bundle, tmp_path / "state", bad_token_burst=3, bad_token_per_s=2.0) as (url, state):
        sid = open_session(url)
        before = b_state(url, state, {sid: AUTH})
        wrong = {"Authorization": "Bearer wrong-token-0123456789"}
        for _ in range(3):
            refused(httpx.post(f"{url}/v1/sessions", headers=wrong), ErrorCode.BAD_TOKEN)
        limited = httpx.post(f"{url}/v1/sessions", headers=wrong)
        refused(limited, ErrorCode.TOO_MANY_ATTEMPTS)
        assert limited.headers["retry-after"] == "1"  # 0.5 s to the next allowance, rounded up
        assert httpx.get(f"{url}/v1/sessions/{sid}", headers=AUTH).status_code == 200  # never the valid token
        assert same(b_state(url, state, {sid: AUTH}), before) and len(state.sessions) == 1
        time.sleep(float(limited.headers["retry-after"]))
        refused(httpx.post(f"{url}/v1/sessions", headers=wrong), ErrorCode.BAD_TOKEN)


# -- single split: labels and MSE targets ----------------------------------------------------------------------

def test_label_out_of_range(mlp_single_bundle: Path, tmp_path: Path) -> None:
    with threaded_server(mlp_single_bundle, tmp_path / "state") as (url, state):
        sid = open_session(url)
        x = np.random.default_rng(0).standard_normal((4, *state.spec.input.sample_shape)).astype(np.float32)
        before = b_state(url, state, {sid: AUTH})
        for labels in ([0, 1, 2, 10], [0, -1, 2, 3]):
            body = save({"activation": x, "labels": np.array(labels, np.int64)})
            error = refused(post(url, f"/v1/sessions/{sid}/steps/0/train", body), ErrorCode.LABEL_OUT_OF_RANGE)
            assert error["tensor"] == "labels"
        for bad, code in ((np.zeros((4, 1), np.int64), ErrorCode.WRONG_SHAPE),
                          (np.zeros(3, np.int64), ErrorCode.WRONG_SHAPE),
                          (np.zeros(4, np.float32), ErrorCode.WRONG_DTYPE)):
            refused(post(url, f"/v1/sessions/{sid}/steps/0/train", save({"activation": x, "labels": bad})), code)
        assert same(b_state(url, state, {sid: AUTH}), before)
        ok = save({"activation": x, "labels": np.array([0, 1, 2, 9], np.int64)})
        assert post(url, f"/v1/sessions/{sid}/steps/0/train", ok).status_code == 200


@pytest.fixture(scope="module")
def mse_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    part = partition(mlp(), ["relu1"], torch.zeros(2, 1, 8, 8))
    out = tmp_path_factory.mktemp("b") / "mse"
    write_bundle(part, out, source=SourceSpec(file_name="mlp.pt", sha256="0" * 64, kind="state_dict"),
                 loss=LossSpec(kind="mse"), optimizer=OptimizerSpec(lr=0.1, momentum=0.9))
    return out


def test_mse_targets_must_match_the_output_shape(mse_bundle: Path, tmp_path: Path) -> None:
    with threaded_server(mse_bundle, tmp_path / "state") as (url, state):
        sid = open_session(url)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, *state.spec.input.sample_shape)).astype(np.float32)
        out_shape = (4, *state.spec.output.sample_shape)
        assert out_shape == (4, 10)
        before = b_state(url, state, {sid: AUTH})
        for shape in [(4, 10, 1), (4,), (4, 1), (4, 5), (40,), (1, 10)]:
            body = save({"activation": x, "labels": rng.standard_normal(shape).astype(np.float32)})
            error = refused(post(url, f"/v1/sessions/{sid}/steps/0/train", body), ErrorCode.WRONG_SHAPE)
            assert error["tensor"] == "labels", shape
        nan = rng.standard_normal(out_shape).astype(np.float32)
        nan[1, 2] = np.nan
        refused(post(url, f"/v1/sessions/{sid}/steps/0/train", save({"activation": x, "labels": nan})),
                ErrorCode.NON_FINITE)
        ints = save({"activation": x, "labels": np.zeros(out_shape, np.int64)})
        refused(post(url, f"/v1/sessions/{sid}/steps/0/train", ints), ErrorCode.WRONG_DTYPE)
        assert same(b_state(url, state, {sid: AUTH}), before)
        ok = save({"activation": x, "labels": rng.standard_normal(out_shape).astype(np.float32)})
        assert post(url, f"/v1/sessions/{sid}/steps/0/train", ok).status_code == 200
        assert httpx.get(f"{url}/healthz").json()["steps_applied"] == 1


# -- strategies: round-end state that differs between devices --------------------------------------------------

def test_state_mismatch_and_invalid_request(mlp_single_bundle: Path, tmp_path: Path) -> None:
    """Two FedAvg devices end round 0; the second first sends other shapes (422 state_mismatch), which leaves
    no trace: the round still averages the two matching states."""
    with threaded_server(mlp_single_bundle, tmp_path / "state", strategy="fedavg", num_clients=2,
                         round_timeout_s=20) as (url, _state):
        a, b = open_session(url), open_session(url)
        end = "/v1/sessions/{}/rounds/0/end?num_samples=1"
        refused(post(url, end.format(a).replace("=1", "=-1"), save({})), ErrorCode.INVALID_REQUEST)
        state_a = {"A.w": np.full((3,), 1.0, np.float32)}
        state_b = {"A.w": np.full((3,), 3.0, np.float32)}
        first: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: first.update(r=post(url, end.format(a), save(state_a))))
        waiter.start()
        time.sleep(1.0)  # a's state is in the round's barrier (were it not, b's bad state would be accepted)
        info = httpx.get(f"{url}/v1/strategy", headers=AUTH).json()
        for bad in ({"A.w": np.zeros((4,), np.float32)}, {"A.v": np.zeros((3,), np.float32)},
                    {"A.w": np.zeros((3,), np.int64)}):
            refused(post(url, end.format(b), save(bad)), ErrorCode.STATE_MISMATCH)
        assert httpx.get(f"{url}/v1/strategy", headers=AUTH).json() == info
        r = post(url, end.format(b), save(state_b))
        waiter.join()
        assert r.status_code == first["r"].status_code == 200, (r.text, first["r"].text)
        for reply in (r, first["r"]):
            np.testing.assert_array_equal(load(reply.content)["A.w"], np.full((3,), 2.0, np.float32))
        assert httpx.get(f"{url}/v1/strategy", headers=AUTH).json()["round"] == 1
