"""Liveness and Prometheus-style metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from .._deps import State
from .._metrics import CONTENT_TYPE
from .._models import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def health(state: State) -> dict[str, object]:
    return {"status": "ok", "split": state.split, "segment": state.spec.name, "steps_applied": state.applied_steps}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    """Prometheus text format: counters, gauges and the Server-Timing phase histograms."""
    return Response(state.prometheus.render(), media_type=CONTENT_TYPE)
