"""What browsers need from the server: CORS, the training page (``--app``) and the operator dashboard.

Everything the dashboard reads from :class:`~server._state.ServerState` goes through :func:`snapshot`,
the one place coupled to the state's attributes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware

from splitexport.protocol import IDEMPOTENCY_KEY

from ._settings import ServerSettings

if TYPE_CHECKING:
    from ._state import ServerState

JS_PACKAGE = Path(__file__).resolve().parents[1] / "device_runtime" / "js"
"""The JS package (a repository checkout) whose ``app/``, ``src/`` and installed tfjs ``--app`` serves."""
TFJS_BUNDLE = Path("node_modules/@tensorflow/tfjs/dist/tf.fesm.min.js")
EXPOSED_HEADERS = ["Server-Timing", "Retry-After"]
METRICS_PER_SESSION = 1000


def install_cors(app: FastAPI, settings: ServerSettings) -> None:
    """Let pages from ``settings.cors_origins`` call the API (bearer tokens, no cookies)."""
    if not settings.cors_origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                       allow_methods=["GET", "POST", "DELETE"], 
                       allow_headers=["Authorization", "Content-Type", IDEMPOTENCY_KEY],
                       expose_headers=EXPOSED_HEADERS, max_age=settings.cors_max_age_s)


def check_js_package(root: Path = JS_PACKAGE) -> Path:
    """The JS package directory with its app and installed tfjs, or ``ValueError`` (one line) saying what is missing."""
    for need, hint in ((root / "app" / "index.html", "serve --app needs a checkout of the splitexport repository"),
                       (root / TFJS_BUNDLE, f"run `npm ci` in {root} (or `make setup`) to install @tensorflow/tfjs")):
        if not need.is_file():
            raise ValueError(f"--app: {need} is missing; {hint}")
    return root


class PhaseStats:
    """Running totals of the ``Server-Timing`` phases of every answered step call (milliseconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total_ms: dict[str, float] = {}
        self.calls = 0

    def add(self, header: str) -> None:
        parsed: dict[str, float] = {}
        for entry in header.split(","):
            name, _, params = entry.strip().partition(";")
            for param in params.split(";"):
                key, _, value = param.strip().partition("=")
                if key == "dur":
                    try:
                        parsed[name] = float(value)
                    except ValueError:
                        pass
        with self._lock:
            self.calls += 1
            for name, ms in parsed.items():
                self.total_ms[name] = self.total_ms.get(name, 0.0) + ms

    def mean_ms(self) -> dict[str, float]:
        with self._lock:
            return {k: v / self.calls for k, v in self.total_ms.items()} if self.calls else {}


class DeviceMetrics:
    """What devices report with ``POST /v1/sessions/{id}/metrics`` (``{"name": value}``), per session, bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_session: dict[str, deque[dict[str, float]]] = {}

    def add(self, session_id: str, values: dict[str, float]) -> None:
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        if bad:
            raise ValueError(f"metrics {', '.join(bad)} are not finite")
        with self._lock:
            rows = self._by_session.setdefault(session_id, deque(maxlen=METRICS_PER_SESSION))
            rows.append({**values, "t": time.time()})

    def get(self, live: set[str]) -> dict[str, list[dict[str, float]]]:
        """Metrics of the sessions in ``live``; those of sessions the server forgot are dropped."""
        with self._lock:
            for sid in set(self._by_session) - live:
                del self._by_session[sid]
            return {sid: list(rows) for sid, rows in self._by_session.items()}


def snapshot(state: ServerState, metrics: DeviceMetrics, phases: PhaseStats) -> dict[str, object]:
    """The dashboard's view of the server (the only reader of the state's attributes here)."""
    with state._lock:
        sessions = [{**s.public(), "idle_s": round(time.monotonic() - s.last_seen, 3)}
                    for s in state.sessions.values()]
        counters = state.metrics()
    return {
        "time": time.time(),
        "split": state.split,
        "segment": state.spec.name,
        "steps_applied": counters.get("steps_applied_total", 0),
        "counters": counters,
        "sessions": sessions,
        "strategy": state.rounds.info() if state.rounds is not None else None,
        "phases_ms": phases.mean_ms(),
        "step_calls": phases.calls,
        "device_metrics": metrics.get({str(s["session_id"]) for s in sessions}),
    }


def install_browser(app: FastAPI, settings: ServerSettings) -> None:
    """The state the browser routers read (device metrics; with ``settings.app`` the JS package and the phase
    totals) and CORS when configured; the app includes the routers (``device_metrics``, ``webapp``,
    ``dashboard``)."""
    app.state.device_metrics = DeviceMetrics()
    app.state.phases = PhaseStats()
    if settings.app:
        app.state.js_package = check_js_package()
        phases: PhaseStats = app.state.phases

        @app.middleware("http")
        async def server_timing(request: Request, call_next):  # type: ignore[no-untyped-def]
            response = await call_next(request)
            header = response.headers.get("server-timing")
            if header and "/steps/" in request.url.path:
                phases.add(header)
            return response

    install_cors(app, settings)
