"""The server's training state: segment B, device sessions, durability, and which scheduler runs the steps.

Without a strategy, or with one that serves one client at a time (SSL), a session's steps go through the
:class:`~._scheduler.LeaseScheduler` (B held from a forward to its backward); strategies with global
iterations go through ``._rounds.RoundHost`` (barriers). Either way B computes on one thread
(:class:`~._scheduler.BExecutor`) and a step is durable before it is answered (docs/protocol.md, Durability):
without a strategy it is computed up to B's optimizer step, committed to the store (session row, response,
the step's inputs in the log), and only then applied, so a failure before the commit changes nothing.
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
import sqlite3
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load

from splitexport import Bundle, TorchSegment, UnsafeUpdate, load_bundle
from splitexport.protocol import ErrorCode, ServerReply
from splitexport.strategies import STRATEGIES

from ._errors import APIError
from ._faults import delay, fault
from ._metrics import Metrics
from ._ratelimit import FailureLimiter
from ._rounds import RoundHost, build_strategy
from ._scheduler import BExecutor, LeaseScheduler, SessionSteps, StepScheduler
from ._session import Cached, ExactlyOnce, Session
from ._session_writer import SessionWriter
from ._settings import ServerSettings
from ._store import FORMAT, LogEvent, SessionWrite, StateError, StepRecord, Store, unpack
from ._timing import timed
from ._wire import encode, encode_exact, encode_reply, float_tensor, label_tensor

__all__ = ["ServerState", "Session", "StateError", "storage_error"]
log = logging.getLogger("splitexport.server")

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
    """Everything the endpoints share, and the :class:`~._scheduler.Host` the step schedulers use.

    The calls are coroutines on the event loop: bookkeeping there, B's compute and the store's step writes on the
    one :class:`BExecutor` thread (``self._lock`` guards the sessions against the snapshot writer there), session
    opens and deletes on the :class:`~._session_writer.SessionWriter`'s thread: the loop never waits for the disk.
    """

    def __init__(self, settings: ServerSettings, *, replicated: bool = False) -> None:
        """``replicated``: this is one rank of a replicated B (docs/scaling.md). Its B steps depend on the other
        ranks' gradients, which the log does not hold, so it snapshots after every step and does not replay the
        log's B steps on restart (the ranks then align on the most advanced rank's snapshot)."""
        self.settings = settings
        self.replicated = replicated
        self.bundle: Bundle = load_bundle(settings.bundle)
        manifest = self.bundle.manifest
        servers = manifest.server_segments
        if len(servers) != 1:
            raise ValueError(f"the server runs exactly one segment; this bundle has {len(servers)}")
        self.spec = servers[0]
        self.split = "single" if self.spec.is_last else "double"
        self.loss_kind = manifest.loss.kind
        self.num_outputs = int(self.spec.output.sample_shape[-1]) if self.spec.output.sample_shape else 1
        self.segment = TorchSegment(self.bundle.torch_segment(self.spec.name).to(settings.device), manifest.optimizer,
                                    loss=self.loss_kind, input_grad=self._sends_gradient(settings), restorable=True,
                                    checked=settings.strategy is not None, max_grad_norm=settings.max_grad_norm,
                                    device=settings.device)
        self.tokens = {_hash(t) for t in settings.token_set()}
        self.bad_tokens = FailureLimiter(settings.bad_token_burst, settings.bad_token_per_s)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        """Least recently seen first (expiry pops from the front) (``Session.opened`` is the order they opened in)."""
        self.opened_by_key: dict[tuple[str, str], str] = {}
        """(token hash, ``Idempotency-Key``) -> the open session it made."""
        self._opening: dict[str, Session] = {}
        """Sessions whose open is being committed: not usable yet, but they count against the caps."""
        self._opening_by_key: dict[tuple[str, str], tuple[Session, asyncio.Future[None]]] = {}
        """(token hash, ``Idempotency-Key``) -> the open being committed (a retry meanwhile waits for it)."""
        self.applied_steps = 0
        self._opened = 0
        self._since_snapshot = 0
        self._log_seq = 0
        self._lock = threading.RLock()
        self.counters: dict[str, int] = {"requests": 0, "errors": 0, "bytes_in": 0, "bytes_out": 0, "retries": 0,
                                         "storage_errors": 0, "bad_token_limited": 0}
        self.executor = BExecutor()
        self.exactly_once = ExactlyOnce(self.counters)
        self._unsaved: tuple[list[StepRecord], list[LogEvent]] = ([], [])
        """Strategy steps applied in memory whose commit failed: retried with the next commit (in log order)."""
        self.session_prefix = ""
        """Prepended to new session ids (``r<rank>-`` on a replica, so a load balancer can route by it)."""
        self.open_extra: dict[str, object] = {}
        """Added to the ``POST /v1/sessions`` reply (a replica: its rank and URL)."""
        self.rounds: RoundHost | None = None
        """The multi-client strategy layer (``--strategy``); None: per-device sequential steps."""
        if settings.strategy is not None:
            self.rounds = RoundHost(self, build_strategy(self))
        self.scheduler: StepScheduler
        """Global iterations: the barriers; otherwise B's lease, with "no strategy" or SSL as its steps."""
        if self.rounds is not None and self.rounds.global_steps:
            self.scheduler = self.rounds
        else:
            steps: SessionSteps = self.rounds if self.rounds is not None else SoloSteps(self)
            self.scheduler = LeaseScheduler(self, steps)
        self.snapshot_every = 1 if replicated else settings.checkpoint_every or 100
        self.store = Store(settings.state_dir, settings.sqlite_synchronous)
        self.resumed_from = self._restore()
        self.session_writer = SessionWriter(self.store, self._in_session_commit,
                                            lambda: fault("after_session_commit", self.applied_steps))
        self.prometheus = Metrics(self.metrics)

    # -- auth and sessions -------------------------------------------------------------------

    @staticmethod
    def _sends_gradient(settings: ServerSettings) -> bool:
        """Whether B's replies carry dL/d(input) (AdaSplit's do not: its devices train A on a local loss)."""
        strategy = STRATEGIES.get(settings.strategy or "")
        return strategy is None or strategy.sends_gradient

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

    async def open_session(self, token_hash: str, idempotency_key: str | None = None) -> Session:
        """A new session, answered once it is durable; with an ``idempotency_key`` this token opened a still open
        session with (or is opening one with), that session. The commit runs on the session writer's thread."""
        key = None if idempotency_key is None else (token_hash, idempotency_key)
        with self._lock:
            self._expire()
            known = None if key is None else self.opened_by_key.get(key)
            if known is not None and known in self.sessions:
                session = self.sessions[known]
                session.last_seen = time.monotonic()
                self.sessions.move_to_end(known)
                self.counters["retries"] += 1
                return session
            opening = None if key is None else self._opening_by_key.get(key)
            if opening is not None:
                session, committed = opening
                self.counters["retries"] += 1
            else:
                self._check_session_caps(token_hash)
                self._opened += 1
                session = Session(id=self.session_prefix + secrets.token_urlsafe(12), token_hash=token_hash,
                                  idempotency_key=idempotency_key, opened=self._opened)
                self._opening[session.id] = session
                committed = self.session_writer.write(SessionWrite.open(session.id, token_hash, idempotency_key))
                if key is not None:
                    self._opening_by_key[key] = (session, committed)
                # on the loop as soon as the commit ends, whether or not this call is still waiting for it
                committed.add_done_callback(lambda f: self._opened_done(session, key, f))
        await self._committed(committed)
        return session

    def _opened_done(self, session: Session, key: tuple[str, str] | None, committed: asyncio.Future[None]) -> None:
        """An open's commit ended: a committed session becomes usable; a failed one leaves nothing behind."""
        with self._lock:
            self._opening.pop(session.id, None)
            if key is not None:
                self._opening_by_key.pop(key, None)
            if committed.exception() is not None:
                return
            session.last_seen = time.monotonic()
            self.sessions[session.id] = session
            if key is not None:
                self.opened_by_key[key] = session.id

    async def _committed(self, committed: asyncio.Future[None]) -> None:
        """Wait for a session write (shielded: a cancelled call does not undo a commit); a storage error as 507/503."""
        try:
            await asyncio.shield(committed)
        except (OSError, sqlite3.Error) as exc:
            self.counters["storage_errors"] += 1
            raise storage_error(exc) from exc

    def _in_session_commit(self) -> None:
        """Inside a batch of session writes (the writer's thread): the test-only delay and crash points."""
        delay("session_commit")
        fault("in_session_commit", self.applied_steps)

    def _forget(self, session: Session) -> None:
        """Drop a closed or expired session from memory (its store rows go separately)."""
        self.sessions.pop(session.id, None)
        if session.idempotency_key is not None:
            self.opened_by_key.pop((session.token_hash, session.idempotency_key), None)
        self.scheduler.drop(session.id)

    def _check_session_caps(self, token_hash: str) -> None:
        """429 ``too_many_sessions`` when the server or this token already holds its maximum of open sessions."""
        total, cap = len(self.sessions) + len(self._opening), self.settings.max_sessions
        if total >= cap:
            raise APIError.of(ErrorCode.TOO_MANY_SESSIONS, f"the server holds its maximum of {cap} open sessions; "
                              "retry when some have closed or expired", limit=cap)
        mine = sum(s.token_hash == token_hash for group in (self.sessions, self._opening) for s in group.values())
        cap = self.settings.max_sessions_per_token
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

    async def close_session(self, session: Session) -> None:
        """Delete ``session``, answered once the delete is durable (committed on the session writer's thread)."""
        committed = self.session_writer.write(SessionWrite.delete([session.id]))

        def forget(f: asyncio.Future[None]) -> None:
            if f.exception() is None:
                with self._lock:
                    self._forget(session)

        committed.add_done_callback(forget)
        await self._committed(committed)

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
        if gone:  # they are gone from memory; their rows go with the session writer's next batch
            self.session_writer.write_later(SessionWrite.delete(gone))

    # -- the calls ----------------------------------------------------------------------------

    async def forward(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("double", "forward")
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        return await self.scheduler.forward(session, step, x, transport, body_sha)

    async def backward(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("double", "backward")
        return await self.scheduler.backward(
            session, step, lambda: float_tensor(arrays, "grad", self.spec.output, self.settings.max_batch), body_sha)

    async def train(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("single", "train")
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        y = label_tensor(arrays, x.shape[0], self.loss_kind, self.num_outputs)
        return await self.scheduler.train(session, step, x, y, transport, body_sha)

    async def evaluate(self, arrays: dict[str, np.ndarray], session: Session | None = None) -> bytes:
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        if session is None:
            out = await self.executor.run(lambda: self.segment.evaluate(x))
        else:
            self._need_server("evaluate")
            out = await self.scheduler.evaluate(session, x)
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

    def commit_step(self, session: Session, kind: str, step: int, body_sha: str, response: bytes,
                    inputs: dict[str, torch.Tensor] | None, event: LogEvent | None = None) -> None:
        """Persist one session's step and keep it.

        Without a strategy (``inputs``): check the staged step (finite, within ``max_grad_norm``), commit it, then
        apply it: a failure before the commit changes nothing (the caller's ``_abandon`` undoes the provisional
        optimizer step). With one (``event``): the strategy has applied the step; :meth:`commit_applied` logs it.
        """
        n = self.applied_steps + 1
        fault("before_commit", n)
        if inputs is not None:
            try:
                self.segment.try_staged(self.settings.max_grad_norm)
            except UnsafeUpdate as exc:
                code = ErrorCode.NON_FINITE_UPDATE if exc.reason == "non_finite" else ErrorCode.GRADIENT_TOO_LARGE
                raise APIError.of(code, f"{exc}; the step was not applied") from exc
            record = StepRecord(session.id, kind, step, step + 1, body_sha, response, encode_exact(inputs))
            try:
                with timed("checkpoint"):
                    seq = self.store.commit_steps([record], lambda: fault("in_commit", n))
            except (OSError, sqlite3.Error) as exc:
                self.counters["storage_errors"] += 1
                raise storage_error(exc) from exc
            fault("after_commit", n)
            self.segment.apply_staged()
            self._log_seq = seq
        else:
            assert event is not None
            self.commit_applied([StepRecord(session.id, kind, step, step + 1, body_sha, response, None)], [event])
        self.exactly_once.record(session, kind, step, body_sha, response)
        self.applied_steps = n
        self._since_snapshot += 1
        fault("after_apply", n)
        if self._since_snapshot >= self.snapshot_every:
            self.checkpoint()

    def commit_applied(self, records: list[StepRecord], events: list[LogEvent]) -> None:
        """Log what a strategy has applied to B (on B's thread): the devices' rows and replies and the strategy's
        calls in one transaction. A failure (disk full) is counted and the entries retried, in order, with the next
        commit or made moot by the next snapshot: B has stepped and the devices get their replies."""
        old_records, old_events = self._unsaved
        records, events = old_records + records, old_events + events
        try:
            with timed("checkpoint"):
                seq = self.store.commit_steps(records, events=events)
        except (OSError, sqlite3.Error) as exc:
            self.counters["storage_errors"] += 1
            self._unsaved = (records, events)
            log.warning("could not log %d strategy calls (%s: %s); retrying with the next commit", len(events),
                        type(exc).__name__, exc)
            return
        self._unsaved = ([], [])
        self._log_seq = seq or self._log_seq

    def count_step(self) -> None:
        self.applied_steps += 1
        self._since_snapshot += 1

    @property
    def snapshot_due(self) -> bool:
        return self._since_snapshot >= self.snapshot_every

    @timed("checkpoint")
    def checkpoint(self) -> None:
        """Snapshot B and its optimizer (and the strategy); then drop the log up to it.

        A failed snapshot is logged and retried at the next one: the log still holds every step. Runs on B's
        thread without the sessions' lock: session calls on the event loop never wait for a snapshot.
        """
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
            fault("after_snapshot", self.applied_steps)
            self.store.drop_log(self._log_seq)
        except Exception as exc:  # noqa: BLE001 - the step is committed; a snapshot failure must not undo it
            self.counters["storage_errors"] += 1
            log.warning("snapshot failed (%s: %s); retrying at the next one", type(exc).__name__, exc)
            return
        self._since_snapshot = 0
        records, events = self._unsaved
        if events:  # the snapshot holds their effect: only the devices' rows are left to write
            self._unsaved = (records, [])
            self.commit_applied([], [])

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
                cache = {k: Cached(k, step, sha, resp) for k, (step, sha, resp) in s.responses.items()}
                self._opened += 1
                self.sessions[s.id] = Session(s.id, s.token_hash, s.next_step, "forward", now, cache,
                                              idempotency_key=s.idempotency_key, opened=self._opened)
                if s.idempotency_key is not None:
                    self.opened_by_key[(s.token_hash, s.idempotency_key)] = s.id
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"state directory {self.settings.state_dir} is unusable: {exc}") from exc
        if snap is None and replayed == 0 and not self.sessions:
            log.warning("fresh start in %s (synchronous=%s)", self.settings.state_dir, self.store.synchronous)
            return None
        log.warning("resumed from step %d (%d from the snapshot, %d replayed from the log; %d sessions) in %s "
                    "(synchronous=%s)", self.applied_steps, self.applied_steps - replayed, replayed, len(self.sessions),
                    self.settings.state_dir, self.store.synchronous)
        return self.applied_steps

    def _replay_log(self) -> int:
        """Re-apply the logged steps after the snapshot, in order (B's steps are deterministic)."""
        records = self.store.log(self._log_seq)
        before = self.applied_steps
        for seq, kind, step, blob in records:
            if self.rounds is not None:
                if self.replicated:  # the crash window after a commit, before its snapshot (docs/scaling.md)
                    log.warning("not replaying logged %s %d: a replica's B step needs the other ranks' gradients "
                                "(the ranks align on the most advanced rank's snapshot)", kind, step)
                    self._log_seq = seq
                    continue
                self.rounds.replay(kind, step, *unpack(blob))
                self._log_seq = seq
                continue
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
        return self.applied_steps - before

    async def aclose(self) -> None:
        """Final snapshot (after the step in flight) and release the store."""
        try:
            await self.executor.run(self.checkpoint)
        finally:
            self.executor.shutdown()
            self.session_writer.shutdown()
            self.store.close()

    def metrics(self) -> dict[str, float]:
        extra = {**self.scheduler.metrics(), **(self.rounds.metrics() if self.rounds is not None else {})}
        return {"sessions_active": len(self.sessions), "steps_applied_total": self.applied_steps, "lease_waiting": 0,
                "threads": _thread_count(), **{f"{k}_total": v for k, v in self.counters.items()}, **extra}


class SoloSteps:
    """"No strategy", as the lease scheduler's strategy: B's own step for one session, staged until
    :meth:`ServerState.commit_step` has checked and persisted it."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.segment = state.segment

    def b_forward(self, session: Session, x: torch.Tensor) -> torch.Tensor:
        return self.segment.forward(x)

    def b_backward(self, session: Session, step: int, body_sha: str, x: torch.Tensor, g: torch.Tensor,
                   transport: type) -> bytes:
        grad_in = self.segment.stage_gradient(g)
        assert grad_in is not None
        response = encode({"grad": grad_in}, transport)
        self.state.commit_step(session, "backward", step, body_sha, response, {"activation": x, "grad": g})
        return response

    def b_train(self, session: Session, step: int, body_sha: str, x: torch.Tensor, y: torch.Tensor,
                transport: type) -> bytes:
        loss, grad_in, out = self.segment.stage_labels(x, y)
        assert grad_in is not None
        response = encode_reply(ServerReply(grad_in, loss, out), transport)
        self.state.commit_step(session, "train", step, body_sha, response, {"activation": x, "labels": y})
        return response

    def b_evaluate(self, session: Session, x: torch.Tensor) -> torch.Tensor:
        return self.segment.evaluate(x)
