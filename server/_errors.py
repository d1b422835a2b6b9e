"""API errors: a status code and a machine-readable body ``{"error": {"code", "message", ...}}``.

The codes are :class:`splitexport.protocol.ErrorCode`; docs/protocol.md lists them with their statuses.
"""

from __future__ import annotations

from typing import Any

from splitexport.protocol import ErrorCode, ProtocolError


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = str(code)
        self.message = message
        self.details = details

    @classmethod
    def of(cls, code: ErrorCode, message: str, **details: Any) -> APIError:
        """The error ``code`` with its documented status."""
        return cls(code.status, code, message, **details)

    @classmethod
    def from_protocol(cls, exc: ProtocolError) -> APIError:
        return cls.of(exc.code, exc.message, **exc.details)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}
