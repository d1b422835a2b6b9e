"""A per-address token bucket on wrong bearer tokens (429 ``too_many_attempts``, docs/protocol.md).

Only wrong tokens draw from a bucket: a valid token is checked first and always passes, so a device sharing an
address (NAT, a proxy) with a guesser is never refused. The limit sheds load and tells a misconfigured client to
stop; it does not hide whether a guess was right (tokens have at least 16 characters, see ``MIN_TOKEN_LENGTH``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

MAX_ADDRESSES = 10_000
"""Buckets kept at most; beyond it the least recently used is dropped (a full bucket again)."""


class FailureLimiter:
    """``burst`` wrong attempts per address at once, refilled at ``per_s`` per second."""

    def __init__(self, burst: int, per_s: float, max_addresses: int = MAX_ADDRESSES) -> None:
        self.burst, self.per_s, self.max_addresses = burst, per_s, max_addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """address -> (tokens left, when counted), least recently used first."""
        self._lock = threading.Lock()

    def fail(self, address: str) -> float:
        """Count one wrong attempt from ``address``: 0 when it is within the limit, else the seconds until the
        next attempt would be (the attempt is then not counted)."""
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.pop(address, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.per_s)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.per_s
            self._buckets[address] = (tokens, now)
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
            return wait
