"""``POST /v1/sessions/{id}/metrics``: a device's loss/accuracy, kept for the dashboard and fed to the strategy."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from .._deps import CurrentSession, State
from .._errors import APIError
from .._rounds import RoundHost

router = APIRouter(prefix="/v1", tags=["metrics"])


@router.post("/sessions/{session_id}/metrics", status_code=204)
async def report(metrics: dict[str, float], session: CurrentSession, state: State, request: Request) -> Response:
    """``{"name": value}``, e.g. ``{"epoch": 1, "loss": 0.7, "accuracy": 0.9}``: shown on ``/dashboard``, and passed
    to ``Strategy.observe`` when the server runs a strategy."""
    try:
        request.app.state.device_metrics.add(session.id, metrics)
    except ValueError as exc:
        raise APIError(422, "invalid_request", str(exc)) from exc
    rounds: RoundHost | None = state.rounds
    if rounds is not None:
        await rounds.observe(session, metrics)
    return Response(status_code=204)
