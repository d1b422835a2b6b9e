"""``/dashboard``: the operator's live page, and the JSON it polls (``GET /v1/dashboard``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from .._browser import snapshot
from .._deps import Caller, State
from .._models import Dashboard

router = APIRouter(tags=["dashboard"])


@router.get("/dashboard", include_in_schema=False)
def page(request: Request) -> FileResponse:
    root: Path = request.app.state.js_package
    return FileResponse(root / "app" / "dashboard.html", media_type="text/html")


@router.get("/v1/dashboard", response_model=Dashboard)
def data(state: State, _: Caller, request: Request) -> dict[str, object]:
    """Sessions, steps applied, mean Server-Timing phases, device-reported metrics, strategy state."""
    return snapshot(state, request.app.state.device_metrics, request.app.state.phases)
