"""The training calls' lean path: forward, backward, train and evaluate without FastAPI's per-request work.

These four calls are the server's hot path: every device makes two of them per step, and for a small segment B
FastAPI's own work for a call (the exception and exit-stack middlewares, matching the path against every route,
resolving dependencies, validating parameters) cost more than B's compute (docs/benchmarks.md, per-step CPU).
:class:`TensorCalls` is plain ASGI middleware that matches these paths itself and calls the routes' own
functions (:mod:`.routers.sessions`) with the dependency they declare (:func:`._deps.tensor_call`), so the two
ways in run the same checks in the same order and answer the same bytes. The routes stay declared in FastAPI:
they make the OpenAPI document, and they serve whatever this path leaves to them (another method, a step that is
not a plain decimal number: FastAPI's validation answers those as before).

It sits inside the middlewares that every call goes through (CORS, the body deadline, the request counters), so
those apply unchanged; an :class:`~._errors.APIError` answers the documented envelope, and a crash reaches the
server's 500 handler as from a route.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._deps import TensorCall, tensor_call
from ._errors import APIError
from ._http_errors import api_error_response
from .routers import sessions

_STEP = re.compile(r"/v1/sessions/([^/]+)/steps/([0-9]+)/(forward|backward|train)")
_EVALUATE = re.compile(r"/v1/sessions/([^/]+)/evaluate")
_STEP_CALLS: dict[str, Callable[[int, TensorCall], Awaitable[Response]]] = {
    "forward": sessions.forward, "backward": sessions.backward, "train": sessions.train}


class TensorCalls:
    """ASGI middleware serving ``POST /v1/sessions/{id}/steps/{n}/{forward,backward,train}`` and
    ``POST /v1/sessions/{id}/evaluate`` through their routes' functions; every other request goes on to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        call: Callable[[TensorCall], Awaitable[Response]]
        if (step_call := _STEP.fullmatch(path)) is not None:
            session_id, step, kind = step_call.groups()
            call = functools.partial(_STEP_CALLS[kind], int(step))
        elif (evaluate := _EVALUATE.fullmatch(path)) is not None:
            session_id, call = evaluate.group(1), sessions.evaluate
        else:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await call(await tensor_call(request, session_id, request.headers.get("authorization")))
        except APIError as exc:
            response = api_error_response(exc)
        await response(scope, receive, send)
