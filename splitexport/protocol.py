"""The wire contract of the splitexport server (docs/protocol.md), shared by the server and its clients.

The media type, the tensor names, the URL paths, every error code with its HTTP status, the safetensors
limits and the codec, and the types a strategy's round sends (:class:`ServerReply`, :data:`DeviceState`). The JS client's copy (``device_runtime/js/src/protocol.js``) is generated from this
module (``python -m splitexport.protocol --js``) and a test keeps the two equal.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import torch

MEDIA_TYPE = "application/vnd.safetensors"
ACCEPTED_MEDIA_TYPES = (MEDIA_TYPE, "application/octet-stream")
IDEMPOTENCY_KEY = "Idempotency-Key"
"""Request header of ``POST /v1/sessions`` (1-255 characters): a retry with the same key and token answers the
session the first call opened while it is open, instead of opening another."""

MAX_HEADER_BYTES = 1 << 20
"""A safetensors header (its JSON) longer than this is refused before it is parsed (413 header_too_large)."""
MAX_TENSORS = 4096
"""A body naming more tensors than this is refused before any tensor is read (413 header_too_large)."""

WIRE_DTYPES: dict[str, type] = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
"""The safetensors dtypes the server reads; any other (BF16, F8_*, F64, U8, ...) is 422 wrong_dtype."""
RESPONSE_DTYPES = (*WIRE_DTYPES, "U8")
"""The dtypes a response may hold (``shared`` is U8)."""


class Tensor(StrEnum):
    """Tensor names in request and response bodies."""

    ACTIVATION = "activation"
    """Request of forward, train, evaluate: the input of B, ``[batch, *B.input]``."""
    LABELS = "labels"
    """Request of train (single split): int class ids ``[batch]``, or MSE targets shaped like B's output."""
    GRAD = "grad"
    """Request of backward: dL/d(B output); response of backward and train: dL/d(B input)."""
    OUTPUT = "output"
    """Response of forward, train, evaluate: B's output."""
    LOSS = "loss"
    """Response of train: ``[1]``, the batch's label loss."""
    SHARED = "shared"
    """Response (``--strategy sglr``): ``[1]`` U8, present when ``grad`` is a gradient averaged over devices."""


StepCall = Literal["forward", "backward", "train"]

HEALTHZ = "/healthz"
METRICS = "/metrics"
MANIFEST = "/v1/manifest"
ARTIFACT = "/v1/artifacts/{sha256}"
STRATEGY = "/v1/strategy"
SESSIONS = "/v1/sessions"
SESSION = "/v1/sessions/{session_id}"
STEP = "/v1/sessions/{session_id}/steps/{step}/{call}"
EVALUATE = "/v1/sessions/{session_id}/evaluate"
ITERATION = "/v1/sessions/{session_id}/steps/{step}"
ROUND_END = "/v1/sessions/{session_id}/rounds/{round_index}/end"
ROUND_DONE = "/v1/sessions/{session_id}/rounds/{round_index}/done"
DEVICE_STATE = "/v1/sessions/{session_id}/device-state"
TURN = "/v1/sessions/{session_id}/turn"
SESSION_METRICS = "/v1/sessions/{session_id}/metrics"
PATHS = (HEALTHZ, METRICS, MANIFEST, ARTIFACT, STRATEGY, SESSIONS, SESSION, STEP, EVALUATE, ITERATION, ROUND_END,
         ROUND_DONE, DEVICE_STATE, TURN, SESSION_METRICS)
"""Every route of the server (a test checks them against the app's routes)."""


def path(template: str, **params: object) -> str:
    """``template`` with its ``{params}`` filled in (session ids are URL-safe; nothing needs quoting)."""
    return template.format(**params)


class ErrorCode(StrEnum):
    """Every ``error.code`` the server answers (and ``unreachable``, the clients' own); :attr:`status` is its HTTP status."""

    EMPTY_BODY = "empty_body"
    MALFORMED_BODY = "malformed_body"
    TRUNCATED_BODY = "truncated_body"
    WRONG_CALL = "wrong_call"
    NO_STRATEGY = "no_strategy"
    MISSING_TOKEN = "missing_token"
    BAD_TOKEN = "bad_token"
    BAD_AUTHORIZATION = "bad_authorization"
    NOT_YOUR_SESSION = "not_your_session"
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_ARTIFACT = "unknown_artifact"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TIMEOUT = "body_timeout"
    WRONG_STEP = "wrong_step"
    CONFLICTING_RETRY = "conflicting_retry"
    FORWARD_LOST = "forward_lost"
    WRONG_ROUND = "wrong_round"
    NOT_IN_ROUND = "not_in_round"
    BODY_TOO_LARGE = "body_too_large"
    HEADER_TOO_LARGE = "header_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_REQUEST = "invalid_request"
    MISSING_TENSOR = "missing_tensor"
    WRONG_DTYPE = "wrong_dtype"
    WRONG_SHAPE = "wrong_shape"
    WRONG_BATCH = "wrong_batch"
    NON_FINITE = "non_finite"
    NON_FINITE_UPDATE = "non_finite_update"
    GRADIENT_TOO_LARGE = "gradient_too_large"
    LABEL_OUT_OF_RANGE = "label_out_of_range"
    STATE_MISMATCH = "state_mismatch"
    INTERNAL_ERROR = "internal_error"
    STRATEGY_FAILED = "strategy_failed"
    TOO_MANY_SESSIONS = "too_many_sessions"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    BUSY = "busy"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    INSUFFICIENT_STORAGE = "insufficient_storage"
    REPLICA_LOST = "replica_lost"
    UNREACHABLE = "unreachable"

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def retryable(self) -> bool:
        """Whether the same call may simply be sent again later (the clients retry these by themselves)."""
        return self.status >= 500


_STATUS: dict[ErrorCode, int] = {
    **dict.fromkeys([ErrorCode.EMPTY_BODY, ErrorCode.MALFORMED_BODY, ErrorCode.TRUNCATED_BODY, ErrorCode.WRONG_CALL,
                     ErrorCode.NO_STRATEGY], 400),
    **dict.fromkeys([ErrorCode.MISSING_TOKEN, ErrorCode.BAD_TOKEN, ErrorCode.BAD_AUTHORIZATION], 401),
    ErrorCode.NOT_YOUR_SESSION: 403,
    **dict.fromkeys([ErrorCode.UNKNOWN_SESSION, ErrorCode.UNKNOWN_ARTIFACT, ErrorCode.NOT_FOUND], 404),
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.BODY_TIMEOUT: 408,
    **dict.fromkeys([ErrorCode.WRONG_STEP, ErrorCode.CONFLICTING_RETRY, ErrorCode.FORWARD_LOST, ErrorCode.WRONG_ROUND,
                     ErrorCode.NOT_IN_ROUND], 409),
    **dict.fromkeys([ErrorCode.BODY_TOO_LARGE, ErrorCode.HEADER_TOO_LARGE], 413),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    **dict.fromkeys([ErrorCode.INVALID_REQUEST, ErrorCode.MISSING_TENSOR, ErrorCode.WRONG_DTYPE, ErrorCode.WRONG_SHAPE,
                     ErrorCode.WRONG_BATCH, ErrorCode.NON_FINITE, ErrorCode.NON_FINITE_UPDATE,
                     ErrorCode.GRADIENT_TOO_LARGE, ErrorCode.LABEL_OUT_OF_RANGE,
                     ErrorCode.STATE_MISMATCH], 422),
    **dict.fromkeys([ErrorCode.TOO_MANY_SESSIONS, ErrorCode.TOO_MANY_ATTEMPTS], 429),
    **dict.fromkeys([ErrorCode.INTERNAL_ERROR, ErrorCode.STRATEGY_FAILED], 500),
    **dict.fromkeys([ErrorCode.BUSY, ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.REPLICA_LOST, ErrorCode.UNREACHABLE],
                    503),
    ErrorCode.INSUFFICIENT_STORAGE: 507,
}


class ProtocolError(ValueError):
    """A body that breaks the contract: its :class:`ErrorCode` (which carries the status), a message, details."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


# -- what crosses the wire in a strategy's round ------------------------------------------------------------

DeviceState = dict[str, torch.Tensor]
"""A client's device weights, flat: ``"<segment>.<parameter or buffer>" -> tensor`` (a round-end or turn body)."""


@dataclass
class ServerReply:
    """What the server returns to one client for one iteration (the ``grad``, ``loss``, ``output`` tensors)."""

    grad: torch.Tensor | None
    """``dL/d(B input)`` for the client's device segment; None when the strategy sends none (AdaSplit)."""
    loss: float | None = None
    output: torch.Tensor | None = None
    """B's (detached) output, i.e. the logits of a single split."""


# -- the safetensors codec ---------------------------------------------------------------------------------

def read_header(body: bytes) -> dict[str, dict[str, Any]]:
    """The safetensors header of ``body``, bounded and dtype-checked before any tensor is touched.

    safetensors: an 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
    data_offsets}}`` (plus an optional ``__metadata__``), then the raw little-endian data.
    """
    if not body:
        raise ProtocolError(ErrorCode.EMPTY_BODY, "the request body is empty; send safetensors-encoded tensors")
    if len(body) < 8:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"the body is not valid safetensors: {len(body)} bytes, "
                            "shorter than the 8-byte header length")
    (size,) = struct.unpack("<Q", body[:8])
    if size > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.HEADER_TOO_LARGE, f"the safetensors header is {size} bytes; the limit is "
                            f"{MAX_HEADER_BYTES}", limit=MAX_HEADER_BYTES)
    if 8 + size > len(body):
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"the body is not valid safetensors: the header claims {size} "
                            f"bytes, the body has {len(body) - 8} after the length")
    try:
        header = json.loads(body[8:8 + size])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"the body is not valid safetensors: header: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.MALFORMED_BODY, "the body is not valid safetensors: the header is not an object")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise ProtocolError(ErrorCode.HEADER_TOO_LARGE, f"the body names {len(header)} tensors; the limit is "
                            f"{MAX_TENSORS}", limit=MAX_TENSORS)
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not isinstance(dtype, str):
            raise ProtocolError(ErrorCode.MALFORMED_BODY, f"the body is not valid safetensors: tensor {name!r} has "
                                "no dtype")
        if dtype not in WIRE_DTYPES:
            raise ProtocolError(ErrorCode.WRONG_DTYPE, f"tensor {name!r} is {dtype}; send one of "
                                f"{', '.join(WIRE_DTYPES)}", tensor=name, expected=list(WIRE_DTYPES), got=dtype)
    return header


def decode(body: bytes) -> dict[str, np.ndarray]:
    """The tensors of a request body (:func:`read_header`'s checks first); :class:`ProtocolError` if it is bad."""
    read_header(body)
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(body)
    except (SafetensorError, ValueError, OverflowError, KeyError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED_BODY, f"the body is not valid safetensors: {exc}") from exc


def decode_response(body: bytes) -> dict[str, np.ndarray]:
    """The tensors of a server response (no request limits; the server is trusted)."""
    from safetensors.numpy import load

    return load(body)


def encode(tensors: Mapping[str, np.ndarray], float_dtype: type | None = None) -> bytes:
    """safetensors bytes; floating arrays travel as ``float_dtype`` when given (float32 or float16)."""
    from safetensors.numpy import save

    arrays = {}
    for name, a in tensors.items():
        if float_dtype is not None and np.issubdtype(a.dtype, np.floating):
            a = a.astype(float_dtype, copy=False)
        arrays[name] = np.ascontiguousarray(a)  # safetensors writes the raw buffer
    return save(arrays)


# -- the JS client's copy ------------------------------------------------------------------------------------

def js_module() -> str:
    """``device_runtime/js/src/protocol.js``: the constants above for the JS client."""
    codes = ",\n".join(f"  {c.name}: {json.dumps(c.value)}" for c in ErrorCode)
    status = ",\n".join(f"  {json.dumps(c.value)}: {c.status}" for c in ErrorCode)
    tensors = ",\n".join(f"  {t.name}: {json.dumps(t.value)}" for t in Tensor)
    return (
        "// Generated by `python -m splitexport.protocol --js` from splitexport/protocol.py: do not edit.\n"
        "// tests/device_runtime/test_protocol_contract.py fails when the two differ.\n\n"
        f"export const MEDIA_TYPE = {json.dumps(MEDIA_TYPE)};\n"
        f"export const IDEMPOTENCY_KEY = {json.dumps(IDEMPOTENCY_KEY)};\n"
        f"export const MAX_HEADER_BYTES = {MAX_HEADER_BYTES};\n"
        f"export const MAX_TENSORS = {MAX_TENSORS};\n"
        f"export const WIRE_DTYPES = Object.freeze({json.dumps(list(WIRE_DTYPES))});\n\n"
        "/** Tensor names in request and response bodies. */\n"
        f"export const Tensor = Object.freeze({{\n{tensors},\n}});\n\n"
        "/** Every `error.code` the server answers (and `unreachable`, the client's own). */\n"
        f"export const ErrorCode = Object.freeze({{\n{codes},\n}});\n\n"
        "/** The HTTP status of each error code. */\n"
        f"export const ERROR_STATUS = Object.freeze({{\n{status},\n}});\n"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--js"]:
        sys.exit("usage: python -m splitexport.protocol --js > device_runtime/js/src/protocol.js")
    sys.stdout.write(js_module())
