"""Liveness and Prometheus-style metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from .._deps import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def health(state: State) -> dict[str, object]:
    return {"status": "ok", "split": state.split, "segment": state.spec.name, "steps_applied": state.applied_steps}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> str:
    lines = []
    for name, value in state.metrics().items():
        lines.append(f"# TYPE splitexport_{name} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.append(f"splitexport_{name} {value}")
    return "\n".join(lines) + "\n"
