"""Who may use segment B next, without a thread per waiting device.

A :class:`StepScheduler` takes a session's tensor calls to B. Two implement it: :class:`LeaseScheduler`
(per-session steps: no strategy, or SSL's one client at a time) and ``._rounds.RoundHost`` (barriers:
the strategies with global iterations). Both answer repeated calls through one
:class:`~._session.ExactlyOnce`, and make a step durable through the narrow :class:`Host`.

:class:`Lease` is the per-session scheduler's lock: one session holds B from its forward to its backward
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
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from splitexport.protocol import ErrorCode

from ._errors import APIError
from ._session import ExactlyOnce, Phase, Session
from ._timing import _current
from ._wire import encode

if TYPE_CHECKING:
    from splitexport import TorchSegment

    from ._settings import ServerSettings
    from ._store import LogEvent, StepRecord

T = TypeVar("T")
GradDecoder = Callable[[], tuple[torch.Tensor, type]]
"""Decodes a backward's gradient (after the scheduler's own checks: a lost forward is 409 before a bad body)."""


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


class StepScheduler(Protocol):
    """How a session's tensor calls reach B (exactly once, durable before the reply)."""

    async def forward(self, session: Session, step: int, x: torch.Tensor, transport: type, body_sha: str) -> bytes: ...

    async def backward(self, session: Session, step: int, grad: GradDecoder, body_sha: str) -> bytes: ...

    async def train(self, session: Session, step: int, x: torch.Tensor, y: torch.Tensor, transport: type,
                    body_sha: str) -> bytes: ...

    async def evaluate(self, session: Session, x: torch.Tensor) -> torch.Tensor: ...

    def drop(self, session_id: str) -> None:
        """``session_id`` closed or expired: give up whatever it holds."""

    def metrics(self) -> dict[str, float]: ...


class Host(Protocol):
    """What a scheduler may use of the server: B's thread, the sessions, and the durable commits."""

    @property
    def settings(self) -> ServerSettings: ...

    @property
    def split(self) -> str: ...

    @property
    def executor(self) -> BExecutor: ...

    @property
    def segment(self) -> TorchSegment: ...

    @property
    def sessions(self) -> Mapping[str, Session]: ...

    @property
    def exactly_once(self) -> ExactlyOnce: ...

    def commit_step(self, session: Session, kind: str, step: int, body_sha: str, response: bytes,
                    inputs: dict[str, torch.Tensor] | None, event: LogEvent | None = None) -> None:
        """One session's step, on B's thread: persisted, applied, recorded for retries (see ``ServerState``)."""

    def commit_applied(self, records: list[StepRecord], events: list[LogEvent]) -> None:
        """A strategy's applied calls and the devices' replies, on B's thread, in one transaction."""

    def count_step(self) -> None: ...

    @property
    def applied_steps(self) -> int: ...

    @property
    def snapshot_due(self) -> bool: ...

    def checkpoint(self) -> None: ...


class SessionSteps(Protocol):
    """B's side of one session's step under the lease, on B's thread: "no strategy" (``ServerState``'s
    ``SoloSteps``) or a strategy serving one client at a time (SSL through ``RoundHost``). ``b_backward`` and
    ``b_train`` return the reply after the step is applied and durable (``Host.commit_step``)."""

    def b_forward(self, session: Session, x: torch.Tensor) -> torch.Tensor: ...

    def b_backward(self, session: Session, step: int, body_sha: str, x: torch.Tensor, g: torch.Tensor,
                   transport: type) -> bytes: ...

    def b_train(self, session: Session, step: int, body_sha: str, x: torch.Tensor, y: torch.Tensor,
                transport: type) -> bytes: ...

    def b_evaluate(self, session: Session, x: torch.Tensor) -> torch.Tensor: ...


def _closed(session_id: str) -> APIError:
    return APIError.of(ErrorCode.UNKNOWN_SESSION, f"session {session_id!r} was closed while its call waited for "
                       "segment B; open a new session")


class LeaseScheduler:
    """Per-session steps: ``forward(n)`` then ``backward(n)`` (single split: ``train(n)``), then ``n + 1``.

    A session holds B from its forward to its backward (:class:`Lease`), so updates to the shared B are
    serialized and every backward finds the autograd graph of its own forward. A repeated call returns the
    stored response; any other step is 409 naming the expected one.
    """

    def __init__(self, host: Host, steps: SessionSteps) -> None:
        self.host = host
        self.steps = steps
        self.lease = Lease(host.settings.lease_timeout_s, self._expired)
        self._forward_input: torch.Tensor | None = None
        """The input of the lease holder's forward, logged with its backward."""

    async def forward(self, session: Session, step: int, x: torch.Tensor, transport: type, body_sha: str) -> bytes:
        async def call() -> bytes:
            replay = self._replay_or_check(session, "forward", step, "forward", body_sha)
            if replay is not None:
                return replay
            await self._acquire(session)
            try:
                self.lease.busy = True
                response = await self.host.executor.run(
                    lambda: encode({"output": self.steps.b_forward(session, x)}, transport))
            except BaseException:
                await self._abandon(session)
                raise
            finally:
                self.lease.busy = False
            await self._still_open(session)  # closed while B computed its forward
            self._forward_input = x
            self.host.exactly_once.record(session, "forward", step, body_sha, response, advance=False)
            session.phase = "backward"
            return response

        return await self._exclusive(session, call)

    async def backward(self, session: Session, step: int, grad: GradDecoder, body_sha: str) -> bytes:
        async def call() -> bytes:
            replay = self._replay_or_check(session, "backward", step, "backward", body_sha)
            if replay is not None:
                return replay
            pending_out = self.host.segment.pending_output
            if not self.lease.held_by(session.id) or pending_out is None:
                session.phase = "forward"
                raise APIError(409, "forward_lost", f"the forward of step {step} is gone (server restart or lease "
                               "timeout); send it again", **session.public())
            g, transport = grad()
            if g.shape[0] != pending_out.shape[0]:
                raise APIError(422, "wrong_batch", f"grad has batch {g.shape[0]}, the forward had {pending_out.shape[0]}")
            x = self._forward_input
            assert x is not None
            return await self._step(session, lambda: self.steps.b_backward(session, step, body_sha, x, g, transport))

        return await self._exclusive(session, call)

    async def train(self, session: Session, step: int, x: torch.Tensor, y: torch.Tensor, transport: type,
                    body_sha: str) -> bytes:
        async def call() -> bytes:
            replay = self._replay_or_check(session, "train", step, "forward", body_sha)
            if replay is not None:
                return replay
            await self._acquire(session)
            return await self._step(session, lambda: self.steps.b_train(session, step, body_sha, x, y, transport))

        return await self._exclusive(session, call)

    async def evaluate(self, session: Session, x: torch.Tensor) -> torch.Tensor:
        return await self.host.executor.run(lambda: self.steps.b_evaluate(session, x))

    def drop(self, session_id: str) -> None:
        """A closed session gives B back (a forward it holds B with is undone) and leaves the line for B."""
        if self.lease.held_by(session_id) and not self.lease.busy:
            self._forward_input = None
            self.lease.release(session_id)
            self.host.executor.submit(self.host.segment.discard_pending)
        self.lease.cancel(session_id, _closed(session_id))

    def metrics(self) -> dict[str, float]:
        return {"lease_waiting": self.lease.waiting}

    # -- internals ----------------------------------------------------------------------------

    def _replay_or_check(self, session: Session, kind: str, step: int, phase: Phase, body_sha: str) -> bytes | None:
        """The stored response of a repeated call, ``None`` for the expected call, else 409."""
        replay = self.host.exactly_once.replay(session, kind, step, body_sha, unless_expecting=phase)
        if replay is not None:
            return replay
        if step != session.next_step or phase != session.phase:
            raise APIError(409, "wrong_step", f"expected step {session.next_step} {session.phase}, got step {step} {kind}",
                           **session.public())
        return None

    async def _exclusive(self, session: Session, call: Callable[[], Awaitable[bytes]]) -> bytes:
        """Run one tensor call of ``session`` at a time (a concurrent retry waits, then sees the result)."""
        while session.inflight is not None:
            await asyncio.shield(session.inflight)
        session.inflight = asyncio.get_running_loop().create_future()
        try:
            return await call()
        finally:
            done, session.inflight = session.inflight, None
            done.set_result(None)

    async def _acquire(self, session: Session) -> None:
        t0 = time.perf_counter()
        if await self.lease.acquire(session.id, self.host.settings.lease_timeout_s):
            timer = _current.get()
            if timer is not None:
                timer.add("wait", time.perf_counter() - t0)
            await self._still_open(session)  # B was handed over just as the session closed

    async def _still_open(self, session: Session) -> None:
        """After a wait for B or B's compute: 404 when ``session`` was closed meanwhile (B given back, its forward
        undone), so B is never held for a backward that cannot come."""
        if self.host.sessions.get(session.id) is not session:
            if self.lease.held_by(session.id):
                await self._abandon(session)
            raise _closed(session.id)

    async def _step(self, session: Session, compute: Callable[[], bytes]) -> bytes:
        """Run a step on B's thread under the lease; on any failure the step leaves no trace."""
        self.lease.busy = True
        try:
            return await self.host.executor.run(compute)
        except BaseException:
            await self._abandon(session)
            raise
        finally:
            self.lease.busy = False
            self._forward_input = None
            self.lease.release(session.id)

    async def _abandon(self, session: Session) -> None:
        session.phase = "forward"
        session.cache.pop("forward", None)
        self._forward_input = None
        self.lease.release(session.id)
        await asyncio.shield(self.host.executor.run(self.host.segment.discard_pending))

    async def _expired(self, session_id: str) -> None:
        holder = self.host.sessions.get(session_id)
        if holder is not None:
            holder.phase = "forward"
            holder.cache.pop("forward", None)
        self._forward_input = None
        await self.host.executor.run(self.host.segment.discard_pending)

