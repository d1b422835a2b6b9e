"""The FastAPI application that trains segment B."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import APIError
from ._settings import ServerSettings
from ._state import ServerState
from .routers import artifacts, health, rounds, sessions


class CountRequests:
    """Plain ASGI middleware counting requests and error responses (cheaper than ``@app.middleware``)."""

    def __init__(self, app: ASGIApp, counters: dict[str, int]) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.counters["requests"] += 1

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.counters["errors"] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the app; B is loaded from the bundle alone and restored from ``state_dir`` if present."""
    if not settings.token_set() and not settings.is_loopback():
        raise ValueError(
            f"refusing to listen on {settings.host} without bearer tokens: pass --tokens FILE or set "
            "SPLITEXPORT_TOKENS, or bind to 127.0.0.1"
        )
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.rounds is not None:  # every client of a round may wait in a barrier thread at once
            limiter = anyio.to_thread.current_default_thread_limiter()
            limiter.total_tokens = max(limiter.total_tokens, 4 * state.rounds.num_clients + 16)
        yield
        await state.aclose()

    app = FastAPI(title="splitexport server", version="1", lifespan=lifespan,
                  description="Trains the server segment of a split bundle. See docs/protocol.md.")
    app.state.server = state

    app.add_middleware(CountRequests, counters=state.counters)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": {"code": "invalid_request", "message": str(exc.errors()[:3])}}, status_code=422)

    app.include_router(health.router)
    app.include_router(artifacts.router)
    app.include_router(sessions.router)
    app.include_router(rounds.router)
    return app
