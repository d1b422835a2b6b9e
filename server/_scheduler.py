"""Who may use segment B next, without a thread per waiting device.

:class:`Lease` is the per-session scheduler: one session holds B from its forward to its backward
(single split: for its ``train`` call); the others wait on an asyncio future in arrival order and
the lease is handed to the first of them when it is released. A holder that does not come back
within ``lease_timeout_s`` loses the lease (``on_expire``) to the next waiter. B's compute itself
runs on one dedicated thread (:class:`BExecutor`), so the event loop stays free for ``/healthz``,
auth and session calls while B trains.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ._errors import APIError

T = TypeVar("T")


class BExecutor:
    """The one thread on which B computes, steps and is persisted (calls run in submission order)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitexport-b")

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on B's thread with the caller's context variables (the call timer)."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, fn)

    def submit(self, fn: Callable[[], object]) -> None:
        """Queue ``fn`` on B's thread without waiting for it."""
        self._pool.submit(fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class Lease:
    """B held by one session at a time; waiting is an asyncio future, handed over in FIFO order."""

    def __init__(self, timeout_s: float, on_expire: Callable[[str], Awaitable[None]]) -> None:
        self.timeout_s = timeout_s
        self._on_expire = on_expire
        self.holder: str | None = None
        self._deadline = 0.0
        self.busy = False
        """B is computing for the holder: its lease cannot expire now."""
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def held_by(self, session_id: str) -> bool:
        return self.holder == session_id

    async def acquire(self, session_id: str, wait_s: float) -> bool:
        """Hold B for ``session_id`` (True when the caller had to wait); 503 ``busy`` after ``wait_s``."""
        if self.holder is None or self.holder == session_id:
            self._take(session_id)
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (session_id, fut)
        self._waiters.append(entry)
        deadline = time.monotonic() + wait_s
        try:
            while not fut.done():
                now = time.monotonic()
                if self.holder is not None and not self.busy and now >= self._deadline:
                    expired = self.holder
                    self.holder = None
                    await self._on_expire(expired)  # the holder vanished mid-step: drop its pending graph
                    if self.holder is None:
                        self._hand_over()
                    continue
                if now >= deadline:
                    raise APIError(503, "busy", "segment B is busy with other devices; retry", retry_after_s=1)
                await asyncio.wait([fut], timeout=max(min(deadline, self._deadline) - now, 0.0) + 0.01)
            fut.result()  # raises the error of :meth:`cancel`
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif fut.done() and not fut.cancelled() and self.holder == session_id:
                self.release(session_id)  # handed over just as this caller gave up
            raise
        return True

    def release(self, session_id: str) -> bool:
        """Give B to the next waiter; False when ``session_id`` did not hold it."""
        if self.holder != session_id:
            return False
        self.holder = None
        self._hand_over()
        return True

    def cancel(self, session_id: str, error: BaseException) -> None:
        """``session_id`` is gone (closed, expired): a call of it waiting in line fails with ``error`` and leaves the
        line, so B is never handed to it. (A lease it holds is released with :meth:`release`.)"""
        for entry in [e for e in self._waiters if e[0] == session_id]:
            self._waiters.remove(entry)
            if not entry[1].done():
                entry[1].set_exception(error)

    def _take(self, session_id: str) -> None:
        self.holder = session_id
        self._deadline = time.monotonic() + self.timeout_s

    def _hand_over(self) -> None:
        while self._waiters:
            session_id, fut = self._waiters.popleft()
            if not fut.done():
                self._take(session_id)
                fut.set_result(None)
                return
