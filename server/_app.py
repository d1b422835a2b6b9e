"""The FastAPI application that trains segment B."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._browser import install_browser
from ._http_errors import BodyDeadline, install_error_handlers
from ._openapi import install_openapi
from ._replicas import Replicas
from ._settings import ServerSettings
from ._state import ServerState
from ._tensor_calls import TensorCalls
from .routers import artifacts, dashboard, device_metrics, health, rounds, sessions, webapp


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


def create_app(settings: ServerSettings, replicas: Replicas | None = None) -> FastAPI:
    """Build the app; B is loaded from the bundle alone and restored from ``state_dir`` if present.

    ``replicas``: this rank of a replicated B (:mod:`._replicas`, docs/scaling.md)."""
    if not settings.token_set() and not settings.is_loopback():
        raise ValueError(
            f"refusing to listen on {settings.host} without bearer tokens: pass --tokens FILE or set "
            "SPLITEXPORT_TOKENS, or bind to 127.0.0.1"
        )
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    state = ServerState(settings, replicated=replicas is not None)
    if replicas is not None:
        replicas.attach(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # torch, the app and B are ~330k long-lived objects: a full collection would rescan them all (a
        # 0.1-0.5 s pause of the event loop); frozen, the collector only looks at what requests allocate
        gc.collect()
        gc.freeze()
        yield
        await state.aclose()

    app = FastAPI(title="splitexport server", version="1", lifespan=lifespan,
                  description="Trains the server segment of a split bundle. See docs/protocol.md.")
    app.state.server = state

    app.add_middleware(TensorCalls)  # innermost: the training calls skip FastAPI's routing, not the middlewares
    app.add_middleware(CountRequests, counters=state.counters)

    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)

    app.include_router(health.router)
    app.include_router(artifacts.router)
    app.include_router(sessions.router)
    if replicas is not None:  # before the browser's CORS middleware, which must wrap the 307s it answers
        replicas.install(app)
    install_browser(app, settings)
    app.include_router(device_metrics.router)  # before rounds: POST /v1/sessions/{id}/metrics feeds the dashboard
    if settings.app:
        app.include_router(webapp.router)
        app.include_router(dashboard.router)
    app.include_router(rounds.router)
    return app
