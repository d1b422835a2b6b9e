"""Test-only crash injection at the points where a crash would lose or duplicate work (commit, apply,
snapshot, round end); the kill, restart and recovery tests set ``SPLITEXPORT_FAULT``."""

from __future__ import annotations

import os
import signal

FAULT_POINTS = ("before_commit", "in_commit", "after_commit", "after_apply", "in_snapshot", "after_snapshot",
                "after_round_end")


def fault(point: str, applied_steps: int) -> None:
    """Test-only crash injection: ``SPLITEXPORT_FAULT=<point>:<n>`` SIGKILLs the server the first time it
    reaches ``point`` (one of :data:`FAULT_POINTS`) at or after its ``n``-th applied step."""
    spec = os.environ.get("SPLITEXPORT_FAULT")
    if spec:
        name, _, n = spec.partition(":")
        if name == point and applied_steps >= int(n or 0):
            os.kill(os.getpid(), signal.SIGKILL)
