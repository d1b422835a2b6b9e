"""The strategy layer (``--strategy``): iteration membership, round ends, device-weight exchange."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from .._deps import Body, Caller, CurrentSession, State
from .._errors import APIError
from .._models import IterationStatus, StrategyInfo
from .._rounds import RoundHost
from .._wire import MEDIA_TYPE

router = APIRouter(prefix="/v1", tags=["strategy"])


def _host(state: State) -> RoundHost:
    if state.rounds is None:
        raise APIError(400, "no_strategy", "the server trains devices one by one; start it with --strategy to use "
                       "rounds (see docs/protocol.md)")
    return state.rounds


def _tensors(state: State, data: bytes) -> Response:
    state.counters["bytes_out"] += len(data)
    return Response(content=data, media_type=MEDIA_TYPE)


@router.get("/strategy", response_model=StrategyInfo)
async def strategy(state: State, _: Caller) -> dict[str, object]:
    """The strategy, its learning rates, and where training stands (round, next iteration)."""
    return _host(state).info()


@router.get("/sessions/{session_id}/steps/{step}", response_model=IterationStatus,
            response_model_exclude_unset=True)
async def step_status(step: int, session: CurrentSession, state: State) -> dict[str, object]:
    """Whether this session takes part in iteration ``step`` (waits until that iteration opens)."""
    return await _host(state).status(session, step)


@router.post("/sessions/{session_id}/rounds/{round_index}/end")
async def end_round(round_index: int, session: CurrentSession, state: State, body: Body,
                    num_samples: Annotated[int, Query(ge=0)] = 0) -> Response:
    """Close the round: device state in (may be empty), the device state to load out (empty: keep yours)."""
    host = _host(state)
    data = await host.end_round(session, round_index, body.arrays, num_samples, body.sha256)
    return _tensors(state, data)


@router.post("/sessions/{session_id}/rounds/{round_index}/done", status_code=204)
async def leave_round(round_index: int, session: CurrentSession, state: State) -> Response:
    """No more batches this round: the round's iterations stop waiting for this session."""
    await _host(state).leave_round(session, round_index)
    return Response(status_code=204)


@router.get("/sessions/{session_id}/device-state")
async def relayed_state(session: CurrentSession, state: State) -> Response:
    """SSL: the device weights to load before this session's turn (empty: keep your own)."""
    return _tensors(state, await _host(state).relayed_state(session))


@router.post("/sessions/{session_id}/turn", status_code=204)
async def end_turn(session: CurrentSession, state: State, body: Body) -> Response:
    """SSL: this session's device weights after its turn, for the next client."""
    await _host(state).end_turn(session, body.arrays)
    return Response(status_code=204)
