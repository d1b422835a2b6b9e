"""Test-only fault injection: crashes at the points where a crash would lose or duplicate work (commit, apply,
snapshot, round end; the kill, restart and recovery tests set ``SPLITEXPORT_FAULT``), and slow writes
(``SPLITEXPORT_DELAY``: a store transaction that takes seconds, as a slow disk's fsync would)."""

from __future__ import annotations

import os
import signal
import time

FAULT_POINTS = ("before_commit", "in_commit", "after_commit", "after_apply", "in_snapshot", "after_snapshot",
                "after_round_end", "in_session_commit", "after_session_commit")
DELAY_POINTS = ("session_commit",)


def fault(point: str, applied_steps: int) -> None:
    """Test-only crash injection: ``SPLITEXPORT_FAULT=<point>:<n>`` SIGKILLs the server the first time it
    reaches ``point`` (one of :data:`FAULT_POINTS`) at or after its ``n``-th applied step."""
    spec = os.environ.get("SPLITEXPORT_FAULT")
    if spec:
        name, _, n = spec.partition(":")
        if name == point and applied_steps >= int(n or 0):
            os.kill(os.getpid(), signal.SIGKILL)


def delay(point: str) -> None:
    """Test-only slowness: ``SPLITEXPORT_DELAY=<point>:<seconds>`` sleeps that long every time the server reaches
    ``point`` (one of :data:`DELAY_POINTS`; ``session_commit``: inside the transaction of a batch of session opens
    and deletes, the store's lock held, as during a slow fsync)."""
    spec = os.environ.get("SPLITEXPORT_DELAY")
    if spec:
        name, _, seconds = spec.partition(":")
        if name == point:
            time.sleep(float(seconds))
