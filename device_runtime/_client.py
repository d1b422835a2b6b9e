"""HTTP client for the splitexport server: segment B as a :class:`SegmentRunner`.

Retries with exponential backoff on connection errors, 503 (honouring ``Retry-After``) and 5xx;
resumes a session after a server restart (re-sending a forward the server lost, answered
``409 forward_lost`` or ``409 wrong_step`` expecting that forward), so no step is lost or applied
twice. The constants and the codec are :mod:`splitexport.protocol`. See docs/protocol.md.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx
import numpy as np
import torch

from splitexport import protocol
from splitexport.protocol import MEDIA_TYPE, ErrorCode, Tensor


class ServerError(RuntimeError):
    """The server refused a call (4xx) or stayed unreachable through every retry."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"{status} {err.get('code', '')}: {err.get('message', body)}")
        self.status = status
        self.code = err.get("code", "")
        self.details = err


class ServerClient:
    """A session-less HTTP client with retries."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        max_wait_s: float = 120.0,
        backoff_s: float = 0.1,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.max_wait_s = max_wait_s
        self.backoff_s = backoff_s
        self.retries = 0
        self.server_timing: dict[str, float] = {}
        """The last successful response's ``Server-Timing`` phases, in milliseconds."""

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, tensors: bytes | None = None, json: Any = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        """Send one call, retrying transport failures, 503 and 5xx until ``max_wait_s`` has passed; every 4xx
        (429 included) is final."""
        deadline = time.monotonic() + self.max_wait_s
        delay = self.backoff_s
        while True:
            wait = delay
            try:
                sent = {**({"Content-Type": MEDIA_TYPE} if tensors is not None else {}), **(headers or {})}
                response = self.http.request(method, path, content=tensors, json=json, headers=sent)
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise ServerError(response.status_code, _json(response))
                    self.server_timing = parse_server_timing(response.headers.get("server-timing", ""))
                    return response
                failure: Exception = ServerError(response.status_code, _json(response))
                if response.status_code == 503:
                    wait = max(wait, retry_after_s(response.headers.get("retry-after")))
            except httpx.TransportError as exc:
                failure = exc
            if time.monotonic() + wait > deadline:
                raise ServerError(503, {"error": {"code": ErrorCode.UNREACHABLE, "message": str(failure)}}) from failure
            self.retries += 1
            time.sleep(wait)
            delay = min(delay * 2, 2.0)

    def open_session(self) -> dict[str, Any]:
        """A new session; its retries carry one ``Idempotency-Key``, so a lost reply opens no second session."""
        key = {protocol.IDEMPOTENCY_KEY: secrets.token_urlsafe(16)}
        response = self.request("POST", protocol.SESSIONS, headers=key)
        if response.status_code == 307:  # B is replicated: the session lives on (and is served by) another replica
            self.http.base_url = httpx.URL(response.json()["url"])
            response = self.request("POST", response.headers["location"], headers=key)
        return response.json()  # type: ignore[no-any-return]

    def session(self, session_id: str) -> dict[str, Any]:
        return self.request("GET", protocol.path(protocol.SESSION, session_id=session_id)).json()  # type: ignore[no-any-return]


def retry_after_s(header: str | None) -> float:
    """Seconds to wait from a ``Retry-After`` header in seconds (0 when absent or an HTTP date)."""
    try:
        return max(float(header or 0), 0.0)
    except ValueError:
        return 0.0


def parse_server_timing(header: str) -> dict[str, float]:
    """``{name: milliseconds}`` from a ``Server-Timing`` header (entries without ``dur`` are left out)."""
    phases = {}
    for entry in header.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if name and key == "dur":
                try:
                    phases[name] = float(value)
                except ValueError:
                    pass
    return phases


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
        return body if isinstance(body, dict) else {"error": {"message": str(body)}}
    except ValueError:
        return {"error": {"message": response.text[:200]}}


def encode(tensors: dict[str, np.ndarray], fp16: bool = False) -> bytes:
    """safetensors bytes (:func:`splitexport.protocol.encode`); float32 travels as float16 with ``fp16``."""
    return protocol.encode({k: v.astype(np.float16) if fp16 and v.dtype == np.float32 else v
                            for k, v in tensors.items()})


def decode(data: bytes) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 else v)
            for k, v in protocol.decode_response(data).items()}


def forward_lost(exc: ServerError, step: int) -> bool:
    """Whether the server refused a backward because it no longer has its forward (restart, lease timeout).

    A 409 (``forward_lost``, or ``wrong_step`` from a server that restored the session) that expects the
    forward of this very step: send the same forward again, then the backward. A 409 that names another
    step (a global iteration that is over) is not recoverable this way and is raised.
    """
    return (exc.status == ErrorCode.FORWARD_LOST.status and exc.code in (ErrorCode.FORWARD_LOST, ErrorCode.WRONG_STEP)
            and exc.details.get("expected") == "forward" and exc.details.get("next_step") == step)


class RemoteSegment:
    """The server's segment B, driven step by step over HTTP."""

    def __init__(self, client: ServerClient, session_id: str | None = None, *, fp16: bool = False) -> None:
        self.client = client
        info = client.session(session_id) if session_id else client.open_session()
        self.session_id: str = info["session_id"]
        self.step: int = int(info["next_step"])
        self.fp16 = fp16
        self._forward_body: bytes | None = None
        self.lost_forwards = 0
        """How many backwards found their forward lost (server restart) and were recovered by re-sending it."""
        self.shared_gradient = False
        """Whether the last gradient was one shared by several devices (SplitAvg under --strategy sglr)."""

    def _path(self, call: protocol.StepCall) -> str:
        return protocol.path(protocol.STEP, session_id=self.session_id, step=self.step, call=call)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._forward_body = encode({Tensor.ACTIVATION: x.detach().numpy()}, self.fp16)
        response = self.client.request("POST", self._path("forward"), tensors=self._forward_body)
        return decode(response.content)[Tensor.OUTPUT]

    def train_with_gradient(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        body = encode({Tensor.GRAD: grad_out.detach().numpy()}, self.fp16)
        try:
            response = self.client.request("POST", self._path("backward"), tensors=body)
        except ServerError as exc:
            if self._forward_body is None or not forward_lost(exc, self.step):
                raise
            self.lost_forwards += 1  # the server restarted between our forward and backward: both again
            self.client.request("POST", self._path("forward"), tensors=self._forward_body)
            response = self.client.request("POST", self._path("backward"), tensors=body)
        self.step += 1
        self._forward_body = None
        out = decode(response.content)
        self.shared_gradient = Tensor.SHARED in out
        return out[Tensor.GRAD]

    def train_with_labels(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor | None, torch.Tensor]:
        body = encode({Tensor.ACTIVATION: x.detach().numpy(), Tensor.LABELS: labels.detach().numpy()}, self.fp16)
        out = decode(self.client.request("POST", self._path("train"), tensors=body).content)
        self.step += 1
        self.shared_gradient = Tensor.SHARED in out
        # no grad: the strategy sends none (AdaSplit)
        return float(out[Tensor.LOSS][0]), out.get(Tensor.GRAD), out[Tensor.OUTPUT]

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        body = encode({Tensor.ACTIVATION: x.detach().numpy()}, self.fp16)
        path = protocol.path(protocol.EVALUATE, session_id=self.session_id)
        return decode(self.client.request("POST", path, tensors=body).content)[Tensor.OUTPUT]

    # -- multi-client strategies (server started with --strategy; docs/protocol.md) -------------

    def participates(self, step: int) -> bool:
        """Whether this device takes part in the server's iteration ``step`` (waits until it opens).

        With global iterations the next call of this segment is for ``step``.
        """
        info = self.client.request("GET", protocol.path(protocol.ITERATION, session_id=self.session_id, step=step)).json()
        self.step = step
        return bool(info["participate"])

    def end_round(self, round_index: int, device_state: dict[str, torch.Tensor] | None = None,
                  num_samples: int = 0) -> dict[str, torch.Tensor]:
        """Close the round (waits for the round's other devices); the device weights to load (empty: keep yours)."""
        path = protocol.path(protocol.ROUND_END, session_id=self.session_id, round_index=round_index)
        path += f"?num_samples={num_samples}"
        return decode(self.client.request("POST", path, tensors=_state_body(device_state or {})).content)

    def leave_round(self, round_index: int) -> None:
        """No more batches in this round: the server's iterations stop waiting for this device."""
        self.client.request("POST", protocol.path(protocol.ROUND_DONE, session_id=self.session_id,
                                                  round_index=round_index))

    def relayed_state(self) -> dict[str, torch.Tensor]:
        """SSL: the device weights to load before this device's turn (empty: keep your own)."""
        return decode(self.client.request("GET", protocol.path(protocol.DEVICE_STATE, session_id=self.session_id)).content)

    def end_turn(self, device_state: dict[str, torch.Tensor]) -> None:
        """SSL: hand this device's weights after its turn to the next device."""
        self.client.request("POST", protocol.path(protocol.TURN, session_id=self.session_id),
                            tensors=_state_body(device_state))

    def observe(self, metrics: dict[str, float]) -> None:
        """Feedback for the server's strategy (e.g. the device's local loss)."""
        self.client.request("POST", protocol.path(protocol.SESSION_METRICS, session_id=self.session_id), json=metrics)


def _state_body(device_state: dict[str, torch.Tensor]) -> bytes:
    """Device weights as a safetensors body (float32, as stored)."""
    return encode({k: v.detach().contiguous().numpy() for k, v in device_state.items()})
