"""Device sessions and the training calls on segment B (binary safetensors bodies)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Response

from .._deps import Caller, CurrentSession, IdempotencyKey, State, TensorCall, Tensors
from .._models import SessionOpened, SessionState
from .._wire import MEDIA_TYPE, check_targets

router = APIRouter(prefix="/v1/sessions", tags=["training"])


def _tensors(state: State, data: bytes) -> Response:
    state.counters["bytes_out"] += len(data)
    return Response(content=data, media_type=MEDIA_TYPE)


async def _timed_call(body: TensorCall, call: Callable[..., Awaitable[bytes]], *args: Any) -> Response:
    """Await a state call; the response carries its ``Server-Timing`` (docs/protocol.md)."""
    with body.timer.active("b"):
        data = await call(*args)
    body.state.prometheus.observe(call.__name__, body.timer)
    response = _tensors(body.state, data)
    response.headers["Server-Timing"] = body.timer.header()
    return response


@router.post("", status_code=201, response_model=SessionOpened, response_model_exclude_unset=True)
async def open_session(state: State, token_hash: Caller, idempotency_key: IdempotencyKey = None) -> dict[str, object]:
    """Open a session for one device; its steps start at 0. A retry with the same ``Idempotency-Key`` (and
    token) answers the session the first call opened, as long as it is open. With replicated B the reply names
    the replica (``replica``, ``url``); one server leaves them out."""
    s = await state.open_session(token_hash, idempotency_key)
    return {**s.public(), "split": state.split, "segment": state.spec.name, **state.open_extra}


@router.get("/{session_id}", response_model=SessionState)
async def get_session(session: CurrentSession) -> dict[str, object]:
    """Where a session stands (after a restart, the step to continue from)."""
    return session.public()


@router.delete("/{session_id}", status_code=204)
async def close_session(session: CurrentSession, state: State) -> Response:
    await state.close_session(session)
    return Response(status_code=204)


@router.post("/{session_id}/steps/{step}/forward")
async def forward(step: int, t: Tensors) -> Response:
    """Double split: B's activation in, B's output out (B keeps the graph for the backward)."""
    return await _timed_call(t, t.state.forward, t.session, step, t.arrays, t.sha256)


@router.post("/{session_id}/steps/{step}/backward")
async def backward(step: int, t: Tensors) -> Response:
    """Double split: dL/d(B output) in; B takes its aux-loss step; dL/d(B input) out."""
    return await _timed_call(t, t.state.backward, t.session, step, t.arrays, t.sha256)


@router.post("/{session_id}/steps/{step}/train")
async def train(step: int, t: Tensors) -> Response:
    """Single split: activation and labels in; B takes its label-loss step; dL/d(B input) and loss out."""
    check_targets(t.arrays, t.state.spec.output, t.state.loss_kind)
    return await _timed_call(t, t.state.train, t.session, step, t.arrays, t.sha256)


@router.post("/{session_id}/evaluate")
async def evaluate(t: Tensors) -> Response:
    """B in inference mode; changes nothing."""
    return await _timed_call(t, t.state.evaluate, t.arrays, t.session)
