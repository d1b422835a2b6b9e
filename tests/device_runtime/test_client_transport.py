"""The Python client's retry, backoff, ``Retry-After``, error-code and lost-forward logic, over
``httpx.MockTransport`` with a virtual clock (no server, no sleeping): fast and exact.

The handlers answer the way docs/protocol.md says the server does (real safetensors bodies, real error
bodies); the behaviour against a real server (restart, SIGKILL, barriers) is in test_client_recovery.py and
tests/server/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
import torch

from device_runtime import RemoteSegment, ServerClient, ServerError
from device_runtime import _client as client_module
from splitexport import protocol
from splitexport.protocol import IDEMPOTENCY_KEY, MEDIA_TYPE, ErrorCode, Tensor

Handler = Callable[[httpx.Request], httpx.Response]


class Clock:
    """``time.monotonic`` and ``time.sleep`` of the client module: sleeping advances virtual time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(client_module, "time", c)
    return c


@pytest.fixture
def make_client() -> Iterator[Callable[..., ServerClient]]:
    clients: list[ServerClient] = []

    def make(handler: Handler, **kw: float) -> ServerClient:
        client = ServerClient("http://server.test/", "tok", transport=httpx.MockTransport(handler), **kw)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def error(code: ErrorCode, message: str = "refused", headers: dict[str, str] | None = None,
          **details: object) -> httpx.Response:
    return httpx.Response(code.status, json={"error": {"code": code, "message": message, **details}},
                          headers=headers)


def tensors(**arrays: np.ndarray) -> httpx.Response:
    return httpx.Response(200, content=protocol.encode(arrays), headers={"Content-Type": MEDIA_TYPE})


def scripted(*answers: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    """A handler answering the requests in turn (an exception is raised as the transport failure)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers[len(seen)]
        seen.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler, seen


def test_transport_failures_and_5xx_are_retried_with_doubling_backoff(clock: Clock, make_client) -> None:
    handler, seen = scripted(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"),
                             error(ErrorCode.INTERNAL_ERROR), error(ErrorCode.STRATEGY_FAILED),
                             httpx.Response(200, json={"ok": True}, headers={"Server-Timing": "b;dur=1.5, db"}))
    client = make_client(handler, backoff_s=0.1)
    assert client.request("GET", "/healthz").json() == {"ok": True}
    assert len(seen) == 5 and client.retries == 4
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert client.server_timing == {"b": 1.5}
    assert seen[0].headers["Authorization"] == "Bearer tok"


def test_backoff_is_capped_at_two_seconds(clock: Clock, make_client) -> None:
    handler, _ = scripted(*[httpx.ConnectError("down")] * 7, httpx.Response(200, json={}))
    client = make_client(handler, backoff_s=0.5)
    client.request("GET", "/healthz")
    assert clock.sleeps == pytest.approx([0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0])


def test_503_honours_retry_after_in_seconds_and_ignores_dates(clock: Clock, make_client) -> None:
    handler, _ = scripted(error(ErrorCode.BUSY, headers={"Retry-After": "3"}),
                          error(ErrorCode.BUSY, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}),
                          error(ErrorCode.STORAGE_UNAVAILABLE, headers={"Retry-After": "0.05"}),
                          httpx.Response(200, json={}))
    client = make_client(handler, backoff_s=0.1)
    client.request("GET", "/healthz")
    # Retry-After raises the wait above the backoff, never lowers it; a date counts as 0
    assert clock.sleeps == pytest.approx([3.0, 0.2, 0.4])


def test_retry_after_on_a_500_is_not_honoured(clock: Clock, make_client) -> None:
    handler, _ = scripted(error(ErrorCode.INTERNAL_ERROR, headers={"Retry-After": "30"}), httpx.Response(200, json={}))
    make_client(handler, backoff_s=0.1).request("GET", "/healthz")
    assert clock.sleeps == pytest.approx([0.1])


def test_giving_up_after_max_wait_is_503_unreachable_with_the_last_failure(clock: Clock, make_client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return error(ErrorCode.BUSY, "queue full", headers={"Retry-After": "4"})

    client = make_client(handler, backoff_s=0.1, max_wait_s=10)
    start = clock.now
    with pytest.raises(ServerError) as info:
        client.request("POST", "/v1/sessions")
    assert info.value.status == 503 and info.value.code == ErrorCode.UNREACHABLE
    assert "queue full" in str(info.value) and isinstance(info.value.__cause__, ServerError)
    assert clock.sleeps == [4.0, 4.0]  # a third wait would pass the 10 s deadline
    assert clock.now - start <= 10


@pytest.mark.parametrize("code", [c for c in ErrorCode if c.status < 500], ids=str)
def test_every_4xx_is_final_and_maps_to_its_code(code: ErrorCode, clock: Clock, make_client) -> None:
    handler, seen = scripted(error(code, "no", step=3), httpx.Response(200, json={}))
    client = make_client(handler)
    with pytest.raises(ServerError) as info:
        client.request("POST", "/v1/sessions/s/steps/3/forward", tensors=b"x")
    assert (info.value.status, info.value.code) == (code.status, code)
    assert info.value.details["step"] == 3 and info.value.details["message"] == "no"
    assert len(seen) == 1 and client.retries == 0 and clock.sleeps == []
    assert seen[0].headers["Content-Type"] == MEDIA_TYPE


def test_an_error_body_that_is_not_json_still_raises_with_its_text(clock: Clock, make_client) -> None:
    handler, _ = scripted(httpx.Response(404, text="<html>no such route</html>"))
    with pytest.raises(ServerError, match="no such route") as info:
        make_client(handler).request("GET", "/nowhere")
    assert info.value.status == 404 and info.value.code == ""


def test_retries_of_open_session_carry_one_idempotency_key(clock: Clock, make_client) -> None:
    handler, seen = scripted(httpx.ReadTimeout("reply lost"), error(ErrorCode.BUSY),
                             httpx.Response(201, json={"session_id": "s1", "next_step": 0}))
    assert make_client(handler).open_session()["session_id"] == "s1"
    keys = {r.headers[IDEMPOTENCY_KEY] for r in seen}
    assert len(seen) == 3 and len(keys) == 1 and len(keys.pop()) >= 16
    handler2, seen2 = scripted(httpx.Response(201, json={"session_id": "s2", "next_step": 0}))
    make_client(handler2).open_session()
    assert seen2[0].headers[IDEMPOTENCY_KEY] != seen[0].headers[IDEMPOTENCY_KEY]  # a new open, a new key


class StepServer:
    """Segment B's step protocol for one session (B = identity, its input grad = the sent grad), able to
    lose the pending forward once before the backward of step ``lose_at`` (a restart), answering ``code``."""

    def __init__(self, lose_at: int | None = None, code: ErrorCode = ErrorCode.FORWARD_LOST,
                 next_step: int | None = None) -> None:
        self.step, self.lose_at, self.code, self.next_step = 0, lose_at, code, next_step
        self.pending: np.ndarray | None = None
        self.calls: list[tuple[str, bytes]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        if request.method == "POST" and parts == ["v1", "sessions"]:
            return httpx.Response(201, json={"session_id": "s", "next_step": self.step})
        step, call = int(parts[4]), parts[5]
        self.calls.append((call, request.content))
        body = protocol.decode(request.content)
        if call == "forward":
            self.pending = x = body[Tensor.ACTIVATION]
            return tensors(output=x)
        if self.lose_at == step:
            self.lose_at, self.pending = None, None
            expected = self.step if self.next_step is None else self.next_step
            return error(self.code, "the forward is gone", expected="forward", next_step=expected)
        if self.pending is None or step != self.step:
            return error(ErrorCode.WRONG_STEP, "no forward", expected="forward", next_step=self.step)
        self.step, self.pending = self.step + 1, None
        return tensors(grad=body[Tensor.GRAD])


def drive(server: StepServer, make_client, steps: int = 3) -> RemoteSegment:
    remote = RemoteSegment(make_client(server))
    for i in range(steps):
        x = torch.full((2, 3), float(i))
        assert torch.equal(remote.forward(x), x)
        g = torch.full((2, 3), 10.0 + i)
        grad = remote.train_with_gradient(g)
        assert grad is not None and torch.equal(grad, g)
    return remote


@pytest.mark.parametrize("code", [ErrorCode.FORWARD_LOST, ErrorCode.WRONG_STEP])
def test_a_lost_forward_is_sent_again_once_then_the_backward(code: ErrorCode, clock: Clock, make_client) -> None:
    server = StepServer(lose_at=1, code=code)
    remote = drive(server, make_client)
    assert remote.lost_forwards == 1 and remote.step == 3 and server.step == 3
    calls = [c for c, _ in server.calls]
    assert calls == ["forward", "backward", "forward", "backward", "forward", "backward", "forward", "backward"]
    assert server.calls[2][1] == server.calls[4][1]  # the very same forward body, re-sent
    assert clock.sleeps == []  # a 409 is answered at once, not retried


def test_a_409_for_another_step_is_raised_not_recovered(clock: Clock, make_client) -> None:
    server = StepServer(lose_at=1, next_step=5)  # the iteration is over: the server expects step 5
    with pytest.raises(ServerError) as info:
        drive(server, make_client)
    assert info.value.code == ErrorCode.FORWARD_LOST and info.value.details["next_step"] == 5


def test_forward_lost_needs_the_forward_expected_for_this_step() -> None:
    def exc(code: ErrorCode, **details: object) -> ServerError:
        return ServerError(code.status, {"error": {"code": code, "message": "", **details}})

    assert client_module.forward_lost(exc(ErrorCode.FORWARD_LOST, expected="forward", next_step=4), 4)
    assert client_module.forward_lost(exc(ErrorCode.WRONG_STEP, expected="forward", next_step=4), 4)
    assert not client_module.forward_lost(exc(ErrorCode.WRONG_STEP, expected="backward", next_step=4), 4)
    assert not client_module.forward_lost(exc(ErrorCode.FORWARD_LOST, expected="forward", next_step=3), 4)
    assert not client_module.forward_lost(exc(ErrorCode.CONFLICTING_RETRY, expected="forward", next_step=4), 4)


def test_fp16_sends_float16_and_answers_float32(clock: Clock, make_client) -> None:
    server = StepServer()
    remote = RemoteSegment(make_client(server), fp16=True)
    out = remote.forward(torch.tensor([[1.0, 2.0]]))
    assert out.dtype == torch.float32
    assert protocol.read_header(server.calls[0][1])[Tensor.ACTIVATION]["dtype"] == "F16"
