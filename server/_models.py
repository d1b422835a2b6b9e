"""Response models of the JSON routes, for the OpenAPI document (docs/protocol.md has the same fields).

The routes still build plain dicts; FastAPI validates them against these models and writes the fields in the
order declared here, which is the order the server always wrote them in (the wire format is unchanged:
``tests/device_runtime/test_protocol_contract.py`` compares the bytes).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Split = Literal["single", "double"]


class SessionState(BaseModel):
    """``GET /v1/sessions/{id}``: where a session stands (after a restart, where to continue)."""

    session_id: str
    next_step: int = Field(ge=0, description="the step the session continues at")
    expected: Literal["forward", "backward"] = Field(description="the call the server expects next for next_step")


class SessionOpened(SessionState):
    """``POST /v1/sessions`` (201): the new session (or, for a repeated ``Idempotency-Key``, the one it opened)."""

    split: Split = Field(description="single: A | B (train calls); double: A | B | C (forward and backward)")
    segment: str = Field(description="the name of the server's segment in the manifest")
    replica: int | None = Field(None, ge=0, description="replicated B (--replicas) only: the replica (rank) that "
                                "serves this session")
    url: str | None = Field(None, description="replicated B only: that replica's base URL, where every call of "
                            "this session goes")


class Health(BaseModel):
    """``GET /healthz`` (no token needed)."""

    status: Literal["ok"]
    split: Split
    segment: str
    steps_applied: int = Field(ge=0)


class ManifestReply(BaseModel):
    """``GET /v1/manifest``: the bundle's manifest.json as written by ``splitexport partition``, and the files a
    device needs (path -> sha256, to fetch from ``/v1/artifacts/{sha256}``)."""

    manifest: dict[str, Any]
    device_files: dict[str, str]


class StrategyInfo(BaseModel):
    """``GET /v1/strategy``: the strategy, its learning rates, and where training stands."""

    strategy: str
    split: Split
    device_sync: Literal["independent", "relay", "average"]
    batches_server: bool
    sends_gradient: bool
    needs_server: bool
    steps: Literal["global", "per_session"]
    num_clients: int
    client_lr: float
    server_lr: float | None = Field(description="None when the strategy trains no server segment (FedAvg)")
    alpha: float
    phi: float
    round: int
    next_iteration: int
    round_timeout_s: float


class IterationStatus(BaseModel):
    """``GET /v1/sessions/{id}/steps/{n}``: whether this session takes part in global iteration ``n``.

    ``expected`` (the iteration's phase) is present only while the iteration is open."""

    step: int
    participate: bool
    open: bool
    participants: int
    round: int
    expected: Literal["forward", "backward", "train"] | None = None


class DashboardSession(SessionState):
    """One open session on the dashboard."""

    idle_s: float = Field(description="seconds since the session was last heard from")


class Dashboard(BaseModel):
    """``GET /v1/dashboard`` (with ``--app``): what the operator's page polls."""

    time: float = Field(description="the server's clock, seconds since the epoch")
    split: Split
    segment: str
    steps_applied: int | float
    counters: dict[str, int | float] = Field(description="the counters of /metrics, by name")
    sessions: list[DashboardSession]
    strategy: StrategyInfo | None
    phases_ms: dict[str, float] = Field(description="mean Server-Timing phases of the step calls")
    step_calls: int
    device_metrics: dict[str, list[dict[str, Any]]] = Field(description="what each session's device reported")
