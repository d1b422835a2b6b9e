"""Where a call's server time goes, sent back in a ``Server-Timing`` header (docs/protocol.md).

The router activates the call's :class:`CallTimer` around the state call (a context variable, which
the worker thread inherits); the wire and checkpoint code add their phases with :func:`timed`, and
the rest of the state call is segment B's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[CallTimer | None] = ContextVar("splitexport_call_timer", default=None)


class CallTimer:
    """Seconds per phase of one call, in the order first seen."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    @contextmanager
    def active(self, rest: str) -> Iterator[None]:
        """Make this the current timer; the block's time not claimed by :func:`timed` phases goes to ``rest``."""
        token = _current.set(self)
        claimed = sum(self.seconds.values())
        t0 = time.perf_counter()
        try:
            yield
        finally:
            total = time.perf_counter() - t0
            self.add(rest, max(total - (sum(self.seconds.values()) - claimed), 0.0))
            _current.reset(token)

    def header(self) -> str:
        """``name;dur=milliseconds`` entries and their ``total``."""
        entries = [*self.seconds.items(), ("total", sum(self.seconds.values()))]
        return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in entries)


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Add the block's duration to the current call's timer (a no-op outside a timed call)."""
    timer = _current.get()
    if timer is None:
        yield
        return
    with timer.measure(name):
        yield
