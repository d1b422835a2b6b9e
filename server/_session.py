"""A device session and the one exactly-once rule every step scheduler applies to it.

Each session keeps the last response of each call kind (``forward``, ``backward``, ``train``, ``end``) with
the sha256 of the body that produced it. A call repeating that step with the same body gets the stored
response without touching B; with another body it gets ``409 conflicting_retry``. The lease and the
barrier scheduler (:mod:`._scheduler`, :mod:`._rounds`) both go through :class:`ExactlyOnce`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

from ._errors import APIError

Phase = Literal["forward", "backward"]


@dataclass
class Cached:
    kind: str
    step: int
    body_sha: str
    response: bytes


@dataclass
class Session:
    id: str
    token_hash: str
    next_step: int = 0
    phase: Phase = "forward"
    last_seen: float = field(default_factory=time.monotonic)
    cache: dict[str, Cached] = field(default_factory=dict)
    """The last response of each call kind, for exactly-once retries."""
    inflight: asyncio.Future[None] | None = None
    """A tensor call of this session is running: a concurrent retry waits for it, then replays."""
    idempotency_key: str | None = None
    """The ``Idempotency-Key`` it was opened with: the same key (and token) opens this session again."""
    opened: int = 0
    """Open order (``ServerState.sessions`` is in least-recently-seen order): a round's clients come in this order."""

    def public(self) -> dict[str, object]:
        return {"session_id": self.id, "next_step": self.next_step, "expected": self.phase}


class ExactlyOnce:
    """Replay stored responses and record new ones; counts replays in ``counters["retries"]``."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters

    def replay(self, session: Session, kind: str, step: int, body_sha: str, *, what: str | None = None,
               unless_expecting: Phase | None = None) -> bytes | None:
        """The stored response of ``kind`` at ``step`` (409 ``conflicting_retry`` for another body); None when there
        is none, or when the session expects exactly this call again (``unless_expecting``: its forward was lost)."""
        cached = session.cache.get(kind)
        if cached is None or cached.step != step:
            return None
        if unless_expecting is not None and (step, unless_expecting) == (session.next_step, session.phase):
            return None
        if cached.body_sha != body_sha:
            raise APIError(409, "conflicting_retry", f"{what or f'step {step} {kind}'} was already applied with a "
                           "different body", **session.public())
        self.counters["retries"] += 1
        return cached.response

    @staticmethod
    def record(session: Session, kind: str, step: int, body_sha: str, response: bytes, *,
               advance: bool = True) -> None:
        """Keep ``response`` for retries; ``advance``: the session's next call is the forward of ``step + 1``."""
        session.cache[kind] = Cached(kind, step, body_sha, response)
        if advance:
            session.next_step, session.phase = step + 1, "forward"
