"""Typed FastAPI dependencies: the shared state, the caller's session, the tensor body.

The training calls take one dependency, :data:`Tensors` (token, session and body resolved in one
coroutine): each extra dependency costs FastAPI's resolver ~20 us per call, which adds up on calls whose
segment B computes in well under a millisecond (docs/benchmarks.md, per-call CPU).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import numpy as np
from fastapi import Depends, Header, Request

from splitexport.protocol import IDEMPOTENCY_KEY

from ._errors import APIError
from ._state import ServerState, Session
from ._timing import CallTimer
from ._wire import ACCEPTED_MEDIA_TYPES, decode


async def get_state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


State = Annotated[ServerState, Depends(get_state)]


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "bad_authorization", "use 'Authorization: Bearer <token>'")
    return token.strip()


async def bearer_token(authorization: Annotated[str | None, Header()] = None) -> str | None:
    return _bearer(authorization)


def _check_caller(request: Request, state: ServerState, token: str | None) -> str:
    return state.check_token(token, request.client.host if request.client else "")


async def caller(request: Request, state: State, token: Annotated[str | None, Depends(bearer_token)]) -> str:
    """The caller's token hash (401 for a missing or wrong token, 429 for too many wrong ones)."""
    return _check_caller(request, state, token)


Caller = Annotated[str, Depends(caller)]


async def current_session(session_id: str, state: State, token_hash: Caller) -> Session:
    return state.session(session_id, token_hash)


CurrentSession = Annotated[Session, Depends(current_session)]

IdempotencyKey = Annotated[str | None, Header(alias=IDEMPOTENCY_KEY, min_length=1, max_length=255,
                                               description="Makes opening a session safe to retry (docs/protocol.md)")]


class TensorBody:
    """The request's safetensors body, size-checked before it is read in full, and the call's timer."""

    def __init__(self, arrays: dict[str, np.ndarray], sha256: str, size: int, timer: CallTimer | None = None) -> None:
        self.arrays = arrays
        self.sha256 = sha256
        self.size = size
        self.timer = timer or CallTimer()


async def tensor_body(request: Request, state: State) -> TensorBody:
    return await _read_tensors(request, state)


async def _read_tensors(request: Request, state: ServerState) -> TensorBody:
    media = request.headers.get("content-type", "").split(";")[0].strip()
    if media not in ACCEPTED_MEDIA_TYPES:
        raise APIError(415, "unsupported_media_type", f"send {ACCEPTED_MEDIA_TYPES[0]}, got {media or 'none'!r}")
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, "body_too_large", f"the body is {declared} bytes; the limit is {limit}", limit=limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes", limit=limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if declared is not None and declared.isdigit() and int(declared) != size:
        raise APIError(400, "truncated_body", f"got {size} of {declared} declared bytes")
    state.counters["bytes_in"] += size
    timer = CallTimer()
    with timer.measure("decode"):
        arrays, digest = decode(body), hashlib.sha256(body).hexdigest()
    return TensorBody(arrays, digest, size, timer)


Body = Annotated[TensorBody, Depends(tensor_body)]


class TensorCall(TensorBody):
    """A training call's state, session (the caller's, token checked) and tensor body."""

    def __init__(self, state: ServerState, session: Session, body: TensorBody) -> None:
        super().__init__(body.arrays, body.sha256, body.size, body.timer)
        self.state = state
        self.session = session


async def tensor_call(request: Request, session_id: str,
                      authorization: Annotated[str | None, Header()] = None) -> TensorCall:
    """:data:`CurrentSession` and :data:`Body` in one dependency (same checks, same order)."""
    state: ServerState = request.app.state.server
    session = state.session(session_id, _check_caller(request, state, _bearer(authorization)))
    return TensorCall(state, session, await _read_tensors(request, state))


Tensors = Annotated[TensorCall, Depends(tensor_call)]
