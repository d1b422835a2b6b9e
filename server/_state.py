"""The server's training state: segment B, device sessions with exactly-once steps, durability.

Step protocol per session (double split): ``forward(n)`` then ``backward(n)``, then
``n + 1``. A device holds B from its forward to its backward (a :class:`~._scheduler.Lease`), so
updates to the shared B are serialized and every backward finds the autograd graph of its own
forward. A repeated call with the same body returns the stored response without touching B; any
other step gets 409 naming the expected one. Single split: one ``train(n)`` call per step.

A step is computed up to B's optimizer step, committed to the store (session row, response, the
step's inputs in the log), and only then applied: a failure before the commit leaves B, its
optimizer and the counters as they were (docs/protocol.md, Durability).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import math
import os
import secrets
import signal
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from splitexport import Bundle, TorchSegment, load_bundle
from splitexport._torch_segment import UnsafeUpdate
from splitexport.protocol import ErrorCode
from splitexport.strategies import ServerReply

from ._errors import APIError
from ._metrics import Metrics
from ._ratelimit import FailureLimiter
from ._scheduler import BExecutor, Lease
from ._settings import ServerSettings
from ._store import FORMAT, StateError, StepRecord, Store, StoredSession
from ._timing import timed
from ._wire import encode, encode_reply, float_tensor, label_tensor

if TYPE_CHECKING:
    from ._rounds import RoundHost

Phase = Literal["forward", "backward"]
log = logging.getLogger("splitexport.server")

FAULT_POINTS = ("before_commit", "in_commit", "after_commit", "after_apply", "in_snapshot")


def fault(point: str, applied_steps: int) -> None:
    """Test-only crash injection: ``SPLITEXPORT_FAULT=<point>:<n>`` SIGKILLs the server the first time it
    reaches ``point`` (one of :data:`FAULT_POINTS`) at or after its ``n``-th applied step."""
    spec = os.environ.get("SPLITEXPORT_FAULT")
    if spec:
        name, _, n = spec.partition(":")
        if name == point and applied_steps >= int(n or 0):
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Cached:
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
    cache: dict[str, _Cached] = field(default_factory=dict)
    """The last response of each call kind, for exactly-once retries."""
    inflight: asyncio.Future[None] | None = None
    """A tensor call of this session is running: a concurrent retry waits for it, then replays."""
    idempotency_key: str | None = None
    """The ``Idempotency-Key`` it was opened with: the same key (and token) opens this session again."""
    opened: int = 0
    """Open order (``ServerState.sessions`` is in least-recently-seen order): a round's clients come in this order."""

    def public(self) -> dict[str, object]:
        return {"session_id": self.id, "next_step": self.next_step, "expected": self.phase}

    def stored(self) -> StoredSession:
        return StoredSession(self.id, self.token_hash, self.next_step, "forward",
                             {k: (c.step, c.body_sha, c.response) for k, c in self.cache.items() if k != "forward"})


def _thread_count() -> int:
    """The process's threads, native ones included (torch's, SQLite's): ``/proc/self/task`` where there is one."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _hash(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def storage_error(exc: BaseException) -> APIError:
    """507 ``insufficient_storage`` for a full disk, 503 ``storage_unavailable`` for other I/O errors."""
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.Error) and "full" in str(exc))
    if full:
        return APIError(507, "insufficient_storage", "the server's state directory is full; the step was not "
                        "applied: retry it (forward first) later", retry_after_s=5)
    return APIError(503, "storage_unavailable", f"the server could not persist the step ({type(exc).__name__}); "
                    "it was not applied: retry it (forward first)", retry_after_s=5)


class ServerState:
    """Everything the endpoints share.

    Without a strategy the per-session calls are coroutines on the event loop: bookkeeping there, B's
    compute and the store's writes on the one :class:`BExecutor` thread. The strategy layer
    (:mod:`._rounds`) runs in worker threads under ``self._lock``.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.bundle: Bundle = load_bundle(settings.bundle)
        manifest = self.bundle.manifest
        servers = manifest.server_segments
        if len(servers) != 1:
            raise ValueError(f"the server runs exactly one segment; this bundle has {len(servers)}")
        self.spec = servers[0]
        self.split = "single" if self.spec.is_last else "double"
        self.loss_kind = manifest.loss.kind
        self.num_outputs = int(self.spec.output.sample_shape[-1]) if self.spec.output.sample_shape else 1
        self.segment = TorchSegment(self.bundle.torch_segment(self.spec.name), manifest.optimizer,
                                    loss=self.loss_kind, input_grad=True, restorable=settings.strategy is None)
        self.tokens = {_hash(t) for t in settings.token_set()}
        self.bad_tokens = FailureLimiter(settings.bad_token_burst, settings.bad_token_per_s)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        """Least recently seen first (expiry pops from the front)."""
        self.opened_by_key: dict[tuple[str, str], str] = {}
        """(token hash, ``Idempotency-Key``) -> the open session it made."""
        self.applied_steps = 0
        self._opened = 0
        self._since_snapshot = 0
        self._log_seq = 0
        self._lock = threading.RLock()
        self.counters: dict[str, int] = {"requests": 0, "errors": 0, "bytes_in": 0, "bytes_out": 0, "retries": 0,
                                         "storage_errors": 0, "bad_token_limited": 0}
        self.lease = Lease(settings.lease_timeout_s, self._lease_expired)
        self.executor = BExecutor()
        self._forward_input: torch.Tensor | None = None
        """The input of the lease holder's forward, logged with its backward."""
        self._dirty: set[str] = set()
        self.rounds: RoundHost | None = None
        """The multi-client strategy layer (``--strategy``); None: per-device sequential steps."""
        if settings.strategy is not None:
            from ._rounds import RoundHost, build_strategy

            self.rounds = RoundHost(self, build_strategy(self))
        self.snapshot_every = settings.checkpoint_every or (1 if self.rounds is not None else 100)
        self.logged = self.rounds is None
        """Steps are logged (and replayed on restart); strategies snapshot every N iterations instead."""
        self.store = Store(settings.state_dir)
        self.resumed_from = self._restore()
        self.prometheus = Metrics(self.metrics)

    # -- auth and sessions -------------------------------------------------------------------

    @property
    def auth_required(self) -> bool:
        return bool(self.tokens)

    def check_token(self, token: str | None, address: str = "") -> str:
        """The caller's token hash; 401 when tokens are configured and this one is not among them, 429 when
        ``address`` sent more wrong tokens than ``bad_token_burst`` (refilled at ``bad_token_per_s``)."""
        if not self.auth_required:
            return _hash(token or "")
        if not token:
            raise APIError(401, "missing_token", "send 'Authorization: Bearer <token>'")
        digest = _hash(token)
        if not any(hmac.compare_digest(digest, t) for t in self.tokens):
            wait = self.bad_tokens.fail(address)
            if wait > 0:
                self.counters["bad_token_limited"] += 1
                raise APIError.of(ErrorCode.TOO_MANY_ATTEMPTS, "too many wrong bearer tokens from this address; "
                                  "check the token, and wait Retry-After seconds", retry_after_s=math.ceil(wait))
            raise APIError(401, "bad_token", "the bearer token is not valid")
        return digest

    def open_session(self, token_hash: str, idempotency_key: str | None = None) -> Session:
        """A new session; with an ``idempotency_key`` this token opened a still open session with, that session."""
        with self._lock:
            self._expire()
            if idempotency_key is not None:
                known = self.opened_by_key.get((token_hash, idempotency_key))
                if known is not None and known in self.sessions:
                    session = self.sessions[known]
                    session.last_seen = time.monotonic()
                    self.sessions.move_to_end(known)
                    self.counters["retries"] += 1
                    return session
            self._check_session_caps(token_hash)
            self._opened += 1
            session = Session(id=secrets.token_urlsafe(12), token_hash=token_hash, idempotency_key=idempotency_key,
                              opened=self._opened)
            try:
                self.store.open_session(session.id, token_hash, idempotency_key)
            except (OSError, sqlite3.Error) as exc:
                self.counters["storage_errors"] += 1
                raise storage_error(exc) from exc
            self.sessions[session.id] = session
            if idempotency_key is not None:
                self.opened_by_key[(token_hash, idempotency_key)] = session.id
            return session

    def _forget(self, session: Session) -> None:
        """Drop a closed or expired session from memory (its store rows go separately)."""
        self.sessions.pop(session.id, None)
        if session.idempotency_key is not None:
            self.opened_by_key.pop((session.token_hash, session.idempotency_key), None)
        self._drop_lease(session.id)

    def _check_session_caps(self, token_hash: str) -> None:
        """429 ``too_many_sessions`` when the server or this token already holds its maximum of open sessions."""
        total, cap = len(self.sessions), self.settings.max_sessions
        if total >= cap:
            raise APIError.of(ErrorCode.TOO_MANY_SESSIONS, f"the server holds its maximum of {cap} open sessions; "
                              "retry when some have closed or expired", limit=cap)
        mine, cap = sum(s.token_hash == token_hash for s in self.sessions.values()), self.settings.max_sessions_per_token
        if mine >= cap:
            raise APIError.of(ErrorCode.TOO_MANY_SESSIONS, f"this token holds its maximum of {cap} open sessions; "
                              "close one (DELETE /v1/sessions/{id}) or continue one of them", limit=cap)

    def session(self, session_id: str, token_hash: str) -> Session:
        with self._lock:
            self._expire()
            session = self.sessions.get(session_id)
            if session is None:
                raise APIError(404, "unknown_session", f"no session {session_id!r} (expired or never opened)")
            if not hmac.compare_digest(session.token_hash, token_hash):
                raise APIError(403, "not_your_session", "this session was opened with another token")
            session.last_seen = time.monotonic()
            self.sessions.move_to_end(session_id)
            return session

    def close_session(self, session: Session) -> None:
        with self._lock:
            try:
                self.store.delete_sessions([session.id])
            except (OSError, sqlite3.Error) as exc:
                self.counters["storage_errors"] += 1
                raise storage_error(exc) from exc
            self._forget(session)

    def _expire(self) -> None:
        """Drop the sessions idle longer than the TTL (oldest first: O(expired), not O(sessions))."""
        limit = time.monotonic() - self.settings.session_ttl_s
        gone = []
        while self.sessions:
            sid, s = next(iter(self.sessions.items()))
            if s.last_seen >= limit:
                break
            self._forget(s)
            gone.append(sid)
        if gone:
            try:
                self.store.delete_sessions(gone)
            except (OSError, sqlite3.Error):  # they are gone from memory; the rows go with the next expiry
                log.warning("could not delete %d expired sessions from the store", len(gone))

    def _drop_lease(self, session_id: str) -> None:
        if self.lease.held_by(session_id) and not self.lease.busy:
            self._forward_input = None
            self.lease.release(session_id)
            self.executor.submit(self.segment.discard_pending)

    async def _lease_expired(self, session_id: str) -> None:
        holder = self.sessions.get(session_id)
        if holder is not None:
            holder.phase = "forward"
            holder.cache.pop("forward", None)
        self._forward_input = None
        await self.executor.run(self.segment.discard_pending)

    # -- exactly-once step bookkeeping --------------------------------------------------------

    def _replay_or_check(self, session: Session, kind: str, step: int, phase: Phase, body_sha: str) -> bytes | None:
        """The stored response of a repeated call, ``None`` for the expected call, else 409."""
        cached = session.cache.get(kind)
        if cached is not None and cached.step == step and (step, phase) != (session.next_step, session.phase):
            if cached.body_sha != body_sha:
                raise APIError(409, "conflicting_retry", f"step {step} {kind} was already applied with a different body",
                               **session.public())
            self.counters["retries"] += 1
            return cached.response
        if step != session.next_step or phase != session.phase:
            raise APIError(409, "wrong_step", f"expected step {session.next_step} {session.phase}, got step {step} {kind}",
                           **session.public())
        return None

    async def _exclusive(self, session: Session, call: Callable[[], Any]) -> Any:
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
        if await self.lease.acquire(session.id, self.settings.lease_timeout_s):
            from ._timing import _current

            timer = _current.get()
            if timer is not None:
                timer.add("wait", time.perf_counter() - t0)

    # -- the calls ----------------------------------------------------------------------------

    async def forward(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("double", "forward")
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        if self.rounds is not None and self.rounds.global_steps:
            return await self.rounds.forward(session, step, x, transport, body_sha)

        async def call() -> bytes:
            replay = self._replay_or_check(session, "forward", step, "forward", body_sha)
            if replay is not None:
                return replay
            await self._acquire(session)

            def compute() -> bytes:
                if self.rounds is None:
                    out = self.segment.forward(x)
                else:
                    with self._lock:
                        out = self.rounds.b_forward(session, x)
                return encode({"output": out}, transport)

            try:
                self.lease.busy = True
                response = await self.executor.run(compute)
            except BaseException:
                await self._abandon(session)
                raise
            finally:
                self.lease.busy = False
            self._forward_input = x
            session.cache["forward"] = _Cached("forward", step, body_sha, response)
            session.phase = "backward"
            return response

        return await self._exclusive(session, call)  # type: ignore[no-any-return]

    async def backward(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("double", "backward")
        if self.rounds is not None and self.rounds.global_steps:
            g, transport = float_tensor(arrays, "grad", self.spec.output, self.settings.max_batch)
            return await self.rounds.backward(session, step, g, transport, body_sha)

        async def call() -> bytes:
            replay = self._replay_or_check(session, "backward", step, "backward", body_sha)
            if replay is not None:
                return replay
            pending_out = self.segment.pending_output
            if not self.lease.held_by(session.id) or pending_out is None:
                session.phase = "forward"
                raise APIError(409, "forward_lost", f"the forward of step {step} is gone (server restart or lease "
                               "timeout); send it again", **session.public())
            g, transport = float_tensor(arrays, "grad", self.spec.output, self.settings.max_batch)
            if g.shape[0] != pending_out.shape[0]:
                raise APIError(422, "wrong_batch", f"grad has batch {g.shape[0]}, the forward had {pending_out.shape[0]}")
            x = self._forward_input
            assert x is not None

            def compute() -> bytes:
                if self.rounds is None:
                    grad_in = self.segment.stage_gradient(g)
                    assert grad_in is not None
                    response = encode({"grad": grad_in}, transport)
                    self._commit(session, "backward", step, body_sha, response, {"activation": x, "grad": g})
                    return response
                with self._lock:
                    grad_in = self.rounds.b_backward(session, g)
                    response = encode({"grad": grad_in}, transport)
                    self._commit(session, "backward", step, body_sha, response, None)
                    return response

            return await self._step(session, compute)

        return await self._exclusive(session, call)  # type: ignore[no-any-return]

    async def train(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("single", "train")
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        y = label_tensor(arrays, x.shape[0], self.loss_kind, self.num_outputs)
        if self.rounds is not None and self.rounds.global_steps:
            return await self.rounds.train(session, step, x, y, transport, body_sha)

        async def call() -> bytes:
            replay = self._replay_or_check(session, "train", step, "forward", body_sha)
            if replay is not None:
                return replay
            await self._acquire(session)

            def compute() -> bytes:
                if self.rounds is None:
                    loss, grad_in, out = self.segment.stage_labels(x, y)
                    assert grad_in is not None
                    response = encode_reply(ServerReply(grad_in, loss, out), transport)
                    self._commit(session, "train", step, body_sha, response, {"activation": x, "labels": y})
                    return response
                with self._lock:
                    response = encode_reply(self.rounds.b_train(session, x, y), transport)
                    self._commit(session, "train", step, body_sha, response, None)
                    return response

            return await self._step(session, compute)

        return await self._exclusive(session, call)  # type: ignore[no-any-return]

    async def _step(self, session: Session, compute: Callable[[], bytes]) -> bytes:
        """Run a step on B's thread under the lease; on any failure the step leaves no trace."""
        self.lease.busy = True
        try:
            return await self.executor.run(compute)
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
        await asyncio.shield(self.executor.run(self.segment.discard_pending))

    async def evaluate(self, arrays: dict[str, np.ndarray], session: Session | None = None) -> bytes:
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        if self.rounds is not None and session is not None:
            self._need_server("evaluate")
            out = await self.rounds.evaluate(session, x)
        else:
            out = await self.executor.run(lambda: self.segment.evaluate(x))
        return encode({"output": out}, transport)

    def _need_server(self, call: str) -> None:
        if self.rounds is not None and not self.rounds.strategy.needs_server:
            raise APIError(400, "wrong_call", f"strategy {self.rounds.strategy.name!r} trains no server segment; "
                           f"{call} is not available (devices call rounds/{{r}}/end only)")

    def _need_split(self, split: str, call: str) -> None:
        self._need_server(call)
        if self.split != split:
            other = "forward/backward" if self.split == "double" else "train"
            raise APIError(400, "wrong_call", f"this bundle is a {self.split} split: use {other}, not {call}")

    # -- durability (on B's thread) -----------------------------------------------------------

    def _commit(self, session: Session, kind: str, step: int, body_sha: str, response: bytes,
                inputs: dict[str, torch.Tensor] | None) -> None:
        """Check the staged step (finite, within ``max_grad_norm``), persist it, then keep it: a failure before
        the commit changes nothing (the caller's ``_abandon`` undoes the provisional optimizer step)."""
        n = self.applied_steps + 1
        fault("before_commit", n)
        if self.logged:
            assert inputs is not None
            try:
                self.segment.try_staged(self.settings.max_grad_norm)
            except UnsafeUpdate as exc:
                code = ErrorCode.NON_FINITE_UPDATE if exc.reason == "non_finite" else ErrorCode.GRADIENT_TOO_LARGE
                raise APIError.of(code, f"{exc}; the step was not applied") from exc
            record = StepRecord(session.id, kind, step, step + 1, body_sha, response, st_save(inputs))
            try:
                with timed("checkpoint"):
                    seq = self.store.commit_steps([record], lambda: fault("in_commit", n))
            except (OSError, sqlite3.Error) as exc:
                self.counters["storage_errors"] += 1
                raise storage_error(exc) from exc
            fault("after_commit", n)
            self.segment.apply_staged()
            self._log_seq = seq
        session.cache[kind] = _Cached(kind, step, body_sha, response)
        session.next_step, session.phase = step + 1, "forward"
        self.applied_steps = n
        self._since_snapshot += 1
        if not self.logged:
            self._dirty.add(session.id)
        fault("after_apply", n)
        if self._since_snapshot >= self.snapshot_every:
            self.checkpoint()

    def touched(self, session: Session) -> None:
        """A strategy changed this session's step or responses (saved with the next snapshot)."""
        self._dirty.add(session.id)

    def count_step(self) -> None:
        self.applied_steps += 1
        self._since_snapshot += 1

    @property
    def snapshot_due(self) -> bool:
        return self._since_snapshot >= self.snapshot_every

    @timed("checkpoint")
    def checkpoint(self) -> None:
        """Snapshot B and its optimizer (and the strategy); then drop the log up to it.

        A failed snapshot is logged and retried at the next one: the log still holds every step
        (with a strategy, which has no log, the iterations since the last snapshot are at risk).
        """
        with self._lock:
            payload: dict[str, Any] = {
                "format": FORMAT,
                "bundle_files": self._bundle_hash(),
                "applied_steps": self.applied_steps,
                "log_seq": self._log_seq,
                "module": self.segment.module.state_dict(),
                "optimizer": self.segment.optimizer.state_dict(),
            }
            if self.rounds is not None:
                payload["strategy"] = self.rounds.state_dict()
            try:
                self.store.write_snapshot(payload, lambda: fault("in_snapshot", self.applied_steps))
                if self.logged:
                    self.store.drop_log(self._log_seq)
                else:
                    dirty = [self.sessions[s].stored() for s in self._dirty if s in self.sessions]
                    self.store.save_sessions(dirty)
                    self._dirty.clear()
            except Exception as exc:  # noqa: BLE001 - the step is committed; a snapshot failure must not undo it
                self.counters["storage_errors"] += 1
                log.warning("snapshot failed (%s: %s); retrying at the next one", type(exc).__name__, exc)
                return
            self._since_snapshot = 0

    def _bundle_hash(self) -> str:
        return _hash(repr(sorted(self.bundle.manifest.files.items())))

    def _restore(self) -> int | None:
        """Load the snapshot, replay the log after it, load the sessions; None for a fresh start."""
        try:
            meta = self.store.meta()
            strategy = self.settings.strategy or ""
            if not meta:
                self.store.set_meta({"format": str(FORMAT), "bundle_files": self._bundle_hash(), "strategy": strategy})
            elif meta.get("format") != str(FORMAT):
                raise StateError(f"{self.store.dir} has state of an unknown format; move it away to start fresh")
            elif meta.get("bundle_files") != self._bundle_hash():
                raise StateError(f"{self.store.dir} belongs to another bundle; use another --state-dir")
            elif meta.get("strategy") != strategy:
                raise StateError(f"{self.store.dir} was written with strategy {meta.get('strategy') or 'none'!r}, the "
                                 f"server runs {strategy or 'none'!r}; use another --state-dir")
            snap = self.store.read_snapshot()
            if snap is not None:
                for k, t in snap["module"].items():
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise StateError(f"{self.store.snapshot_path} holds non-finite weights ({k}); restore it from "
                                         "a backup or use another --state-dir")
                self.segment.module.load_state_dict(snap["module"])
                self.segment.optimizer.load_state_dict(snap["optimizer"])
                self.applied_steps = int(snap["applied_steps"])
                self._log_seq = int(snap["log_seq"])
                if self.rounds is not None:
                    self.rounds.load_state_dict(snap["strategy"])
            replayed = self._replay_log()
            now = time.monotonic()
            for s in self.store.sessions():
                cache = {k: _Cached(k, step, sha, resp) for k, (step, sha, resp) in s.responses.items()}
                self._opened += 1
                self.sessions[s.id] = Session(s.id, s.token_hash, s.next_step, "forward", now, cache,
                                              idempotency_key=s.idempotency_key, opened=self._opened)
                if s.idempotency_key is not None:
                    self.opened_by_key[(s.token_hash, s.idempotency_key)] = s.id
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"state directory {self.settings.state_dir} is unusable: {exc}") from exc
        if snap is None and replayed == 0 and not self.sessions:
            log.warning("fresh start in %s", self.settings.state_dir)
            return None
        log.warning("resumed from step %d (%d from the snapshot, %d replayed from the log; %d sessions) in %s",
                    self.applied_steps, self.applied_steps - replayed, replayed, len(self.sessions),
                    self.settings.state_dir)
        return self.applied_steps

    def _replay_log(self) -> int:
        """Re-apply the logged steps after the snapshot, in order (B's steps are deterministic)."""
        records = self.store.log(self._log_seq)
        for seq, kind, _, blob in records:
            t = st_load(blob)
            if kind == "backward":
                self.segment.forward(t["activation"])
                self.segment.train_with_gradient(t["grad"])
            else:
                self.segment.train_with_labels(t["activation"], t["labels"])
            self.applied_steps += 1
            self._since_snapshot += 1
            self._log_seq = seq
        if records:
            for k, v in self.segment.module.state_dict().items():
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise StateError(f"replaying the step log gives non-finite weights ({k}); use another --state-dir")
        return len(records)

    async def aclose(self) -> None:
        """Final snapshot (after the step in flight) and release the store."""
        try:
            await self.executor.run(self.checkpoint)
        finally:
            self.executor.shutdown()
            self.store.close()

    def metrics(self) -> dict[str, float]:
        return {"sessions_active": len(self.sessions), "steps_applied_total": self.applied_steps,
                "lease_waiting": self.lease.waiting, "threads": _thread_count(),
                **{f"{k}_total": v for k, v in self.counters.items()},
                **(self.rounds.metrics() if self.rounds is not None else {})}
