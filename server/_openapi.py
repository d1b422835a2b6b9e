"""The OpenAPI document says what docs/protocol.md says: safetensors bodies, the bearer scheme, every error.

FastAPI sees the tensor routes as taking no body and answering JSON (they read the raw body and answer
bytes); this rewrites those entries from :mod:`splitexport.protocol` after FastAPI generates the document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from splitexport import protocol
from splitexport.protocol import ErrorCode

TENSOR_REQUESTS = {
    protocol.STEP.replace("{call}", c) for c in ("forward", "backward", "train")
} | {protocol.EVALUATE, protocol.ROUND_END, protocol.TURN}
TENSOR_RESPONSES = (TENSOR_REQUESTS - {protocol.TURN}) | {protocol.DEVICE_STATE}
PUBLIC = {protocol.HEALTHZ, protocol.METRICS}
_BODY_STATUSES = (400, 408, 413, 415)
"""Statuses only a call with a request body can get."""

_SAFETENSORS = {protocol.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}


def _error_responses(with_body: bool) -> dict[str, Any]:
    by_status: dict[int, list[str]] = {}
    for code in ErrorCode:
        if code is not ErrorCode.UNREACHABLE and (with_body or code.status not in _BODY_STATUSES):
            by_status.setdefault(code.status, []).append(code.value)
    return {str(status): {"description": ", ".join(codes),
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for status, codes in sorted(by_status.items())}


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that documents bodies, auth and errors as the protocol has them."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {})["Error"] = {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "enum": [c.value for c in ErrorCode]},
                "message": {"type": "string"}}, "additionalProperties": True}}}
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in doc["paths"].items():
            for op in operations.values():
                op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "authorization"]
                if path not in PUBLIC:
                    op["security"] = [{"bearer": []}]
                if path in TENSOR_REQUESTS:
                    op["requestBody"] = {"required": True, "content": _SAFETENSORS,
                                         "description": "tensors as safetensors (docs/protocol.md)"}
                ok = op["responses"].get("200")
                if path in TENSOR_RESPONSES and ok is not None:
                    ok["content"] = _SAFETENSORS
                op["responses"].pop("422", None)  # FastAPI's validation schema; the envelope replaces it
                if path not in PUBLIC:
                    op["responses"].update(_error_responses("requestBody" in op))
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
