"""Every error answers the documented envelope ``{"error": {"code", "message", ...}}`` (docs/protocol.md).

The handlers for :class:`APIError`, request validation, unknown routes and methods, and crashes; and the
deadline on request bodies (408 ``body_timeout``).
"""

from __future__ import annotations

import json
import logging
import math

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitexport.protocol import ErrorCode

from ._errors import APIError

log = logging.getLogger("splitexport.server")

_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


def _envelope(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def api_error_response(exc: APIError) -> JSONResponse:
    """The envelope of an :class:`APIError`, with ``Retry-After`` on 503 (or when the error names one)."""
    retry_after = exc.details.get("retry_after_s", 1 if exc.status == 503 else None)
    headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure with the envelope: API errors, validation, 404/405, and 500 for crashes."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _envelope(422, ErrorCode.INVALID_REQUEST, str(exc.errors()[:3]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        message = f"no route {request.method} {request.url.path}" if exc.status_code in _HTTP_CODES else str(exc.detail)
        return _envelope(exc.status_code, code, message, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        return _envelope(500, ErrorCode.INTERNAL_ERROR, f"internal error ({type(exc).__name__}); see the server log")


class BodyDeadline:
    """ASGI middleware: a request body must arrive in full within ``timeout_s`` of the request's start.

    Only the reads of the body are timed. When the deadline passes, the middleware answers 408
    ``body_timeout`` itself (closing the connection), tells the route the client is gone, and drops
    whatever the route still sends. A client that leaves mid-body ends the request without a traceback.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.timeout_s
        complete = timed_out = started = gone = False

        async def bounded() -> Message:
            nonlocal complete, timed_out, gone
            if complete or timed_out:  # after the body: e.g. waiting for a disconnect, which has no deadline
                return await receive() if complete else {"type": "http.disconnect"}
            with anyio.move_on_after(max(deadline - anyio.current_time(), 0.0)):
                message = await receive()
                complete = message["type"] != "http.request" or not message.get("more_body", False)
                gone = message["type"] == "http.disconnect"
                return message
            timed_out = True
            if not started:
                body = json.dumps({"error": {
                    "code": ErrorCode.BODY_TIMEOUT, "limit_s": self.timeout_s,
                    "message": f"the request body did not arrive in full within {self.timeout_s:g} s"}}).encode()
                await send({"type": "http.response.start", "status": ErrorCode.BODY_TIMEOUT.status,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            return {"type": "http.disconnect"}

        async def guarded(message: Message) -> None:
            nonlocal started
            if timed_out:
                return  # the 408 is out; the route's own answer has nowhere to go
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded, guarded)
        except Exception:
            if not (timed_out or gone):
                raise
            why = f"the body did not arrive within {self.timeout_s:g} s (408)" if timed_out else "the client left mid-body"
            log.info("%s %s: %s", scope["method"], scope["path"], why)
