"""The server's training state: segment B, device sessions with exactly-once steps, checkpoints.

Step protocol per session (double split): ``forward(n)`` then ``backward(n)``, then
``n + 1``. A device holds B from its forward to its backward (a lease), so
updates to the shared B are serialized and every backward finds the autograd
graph of its own forward. A repeated call with the same body returns the
stored response without touching B; any other step gets 409 naming the
expected one. Single split: one ``train(n)`` call per step.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from splitexport import Bundle, TorchSegment, load_bundle
from splitexport.strategies import ServerReply

from ._errors import APIError
from ._settings import ServerSettings
from ._timing import timed
from ._wire import encode, encode_reply, float_tensor, label_tensor

if TYPE_CHECKING:
    from ._rounds import RoundHost

Phase = Literal["forward", "backward"]
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


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

    def public(self) -> dict[str, object]:
        return {"session_id": self.id, "next_step": self.next_step, "expected": self.phase}


def _hash(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class ServerState:
    """Everything the endpoints share; all mutations happen under ``self._lock``."""

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
        self.segment = TorchSegment(
            self.bundle.torch_segment(self.spec.name), manifest.optimizer, loss=self.loss_kind, input_grad=True
        )
        self.tokens = {_hash(t) for t in settings.token_set()}
        self.sessions: dict[str, Session] = {}
        self.applied_steps = 0
        self._since_checkpoint = 0
        self._lock = threading.RLock()
        self._free = threading.Condition(self._lock)
        self._lease: tuple[str, float] | None = None  # (session id, deadline)
        self.counters: dict[str, int] = {"requests": 0, "errors": 0, "bytes_in": 0, "bytes_out": 0, "retries": 0}
        self.rounds: RoundHost | None = None
        """The multi-client strategy layer (``--strategy``); None: per-device sequential steps."""
        if settings.strategy is not None:
            from ._rounds import RoundHost, build_strategy

            self.rounds = RoundHost(self, build_strategy(self))
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.resumed_from = self._restore()

    # -- auth and sessions -------------------------------------------------------------------

    @property
    def auth_required(self) -> bool:
        return bool(self.tokens)

    def check_token(self, token: str | None) -> str:
        """The caller's token hash; 401 when tokens are configured and this one is not among them."""
        if not self.auth_required:
            return _hash(token or "")
        if not token:
            raise APIError(401, "missing_token", "send 'Authorization: Bearer <token>'")
        digest = _hash(token)
        if not any(hmac.compare_digest(digest, t) for t in self.tokens):
            raise APIError(401, "bad_token", "the bearer token is not valid")
        return digest

    def open_session(self, token_hash: str) -> Session:
        with self._lock:
            self._expire()
            session = Session(id=secrets.token_urlsafe(12), token_hash=token_hash)
            self.sessions[session.id] = session
            return session

    def session(self, session_id: str, token_hash: str) -> Session:
        with self._lock:
            self._expire()
            session = self.sessions.get(session_id)
            if session is None:
                raise APIError(404, "unknown_session", f"no session {session_id!r} (expired or never opened)")
            if not hmac.compare_digest(session.token_hash, token_hash):
                raise APIError(403, "not_your_session", "this session was opened with another token")
            session.last_seen = time.monotonic()
            return session

    def close_session(self, session: Session) -> None:
        with self._lock:
            self.sessions.pop(session.id, None)
            self._release(session.id)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.last_seen > self.settings.session_ttl_s:
                del self.sessions[sid]
                self._release(sid)

    # -- the lease on B between a device's forward and backward -------------------------------

    def _acquire(self, session: Session) -> None:
        deadline = time.monotonic() + self.settings.lease_timeout_s
        while True:
            now = time.monotonic()
            if self._lease is None or self._lease[0] == session.id:
                break
            if self._lease[1] < now:  # the holder vanished mid-step: drop its pending graph
                holder = self.sessions.get(self._lease[0])
                if holder is not None:
                    holder.phase = "forward"
                    holder.cache.pop("forward", None)
                self.segment._pending = None
                self._lease = None
                break
            if now >= deadline:
                raise APIError(503, "busy", "segment B is busy with other devices; retry", retry_after_s=1)
            self._free.wait(timeout=min(self._lease[1], deadline) - now + 0.01)
        self._lease = (session.id, time.monotonic() + self.settings.lease_timeout_s)

    def _release(self, session_id: str) -> None:
        if self._lease is not None and self._lease[0] == session_id:
            self._lease = None
            self.segment._pending = None
            self._free.notify_all()

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

    # -- the calls ----------------------------------------------------------------------------

    def forward(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("double", "forward")
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        if self.rounds is not None and self.rounds.global_steps:
            return self.rounds.forward(session, step, x, transport, body_sha)
        with self._lock:
            replay = self._replay_or_check(session, "forward", step, "forward", body_sha)
            if replay is not None:
                return replay
            self._acquire(session)
            try:
                out = self.segment.forward(x) if self.rounds is None else self.rounds.b_forward(session, x)
            except Exception:
                self._release(session.id)
                raise
            response = encode({"output": out}, transport)
            session.cache["forward"] = _Cached("forward", step, body_sha, response)
            session.phase = "backward"
            return response

    def backward(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("double", "backward")
        if self.rounds is not None and self.rounds.global_steps:
            g, transport = float_tensor(arrays, "grad", self.spec.output, self.settings.max_batch)
            return self.rounds.backward(session, step, g, transport, body_sha)
        with self._lock:
            replay = self._replay_or_check(session, "backward", step, "backward", body_sha)
            if replay is not None:
                return replay
            if self._lease is None or self._lease[0] != session.id or self.segment._pending is None:
                session.phase = "forward"
                raise APIError(409, "forward_lost", f"the forward of step {step} is gone (server restart or lease "
                               "timeout); send it again", **session.public())
            pending_out = self.segment._pending[1]
            g, transport = float_tensor(arrays, "grad", self.spec.output, self.settings.max_batch)
            if g.shape[0] != pending_out.shape[0]:
                raise APIError(422, "wrong_batch", f"grad has batch {g.shape[0]}, the forward had {pending_out.shape[0]}")
            if self.rounds is None:
                grad_in = self.segment.train_with_gradient(g)
            else:
                grad_in = self.rounds.b_backward(session, g)
            assert grad_in is not None
            response = encode({"grad": grad_in}, transport)
            self._finish_step(session, "backward", step, body_sha, response)
            self._release(session.id)
            return response

    def train(self, session: Session, step: int, arrays: dict[str, np.ndarray], body_sha: str) -> bytes:
        self._need_split("single", "train")
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        y = label_tensor(arrays, x.shape[0], self.loss_kind, self.num_outputs)
        if self.rounds is not None and self.rounds.global_steps:
            return self.rounds.train(session, step, x, y, transport, body_sha)
        with self._lock:
            replay = self._replay_or_check(session, "train", step, "forward", body_sha)
            if replay is not None:
                return replay
            self._acquire(session)
            try:
                if self.rounds is None:
                    loss, grad_in, out = self.segment.train_with_labels(x, y)
                    assert grad_in is not None
                    reply = ServerReply(grad_in, loss, out)
                else:
                    reply = self.rounds.b_train(session, x, y)
                response = encode_reply(reply, transport)
            finally:
                self._release(session.id)
            self._finish_step(session, "train", step, body_sha, response)
            return response

    def evaluate(self, arrays: dict[str, np.ndarray], session: Session | None = None) -> bytes:
        x, transport = float_tensor(arrays, "activation", self.spec.input, self.settings.max_batch)
        with self._lock:
            if self.rounds is not None and session is not None:
                self._need_server("evaluate")
                out = self.rounds.evaluate(session, x)
            else:
                out = self.segment.evaluate(x)
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

    def _finish_step(self, session: Session, kind: str, step: int, body_sha: str, response: bytes) -> None:
        session.cache[kind] = _Cached(kind, step, body_sha, response)
        session.next_step = step + 1
        session.phase = "forward"
        self.applied_steps += 1
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.settings.checkpoint_every:
            self.checkpoint()

    # -- durability ---------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.settings.state_dir / CHECKPOINT

    @timed("checkpoint")
    def checkpoint(self) -> None:
        """Write B, its optimizer and the sessions atomically (write, fsync, rename)."""
        with self._lock:
            state = {
                "format": CHECKPOINT_FORMAT,
                "bundle_files": _hash(repr(sorted(self.bundle.manifest.files.items()))),
                "applied_steps": self.applied_steps,
                "module": self.segment.module.state_dict(),
                "optimizer": self.segment.optimizer.state_dict(),
                "sessions": {
                    s.id: {
                        "token_hash": s.token_hash,
                        "next_step": s.next_step,
                        "cache": {
                            k: {"step": c.step, "body_sha": c.body_sha,
                                "response": torch.frombuffer(bytearray(c.response), dtype=torch.uint8)}
                            for k, c in s.cache.items() if k != "forward"
                        },
                    }
                    for s in self.sessions.values()
                },
            }
            if self.rounds is not None:
                state["strategy"] = self.rounds.state_dict()
            tmp = self.checkpoint_path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint_path)
            self._since_checkpoint = 0

    def _restore(self) -> int | None:
        if not self.checkpoint_path.is_file():
            return None
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint_path} has an unknown format; move it away to start fresh")
        if state["bundle_files"] != _hash(repr(sorted(self.bundle.manifest.files.items()))):
            raise ValueError(f"{self.checkpoint_path} belongs to another bundle; use another --state-dir")
        saved = state.get("strategy", {}).get("name")
        if saved != self.settings.strategy:
            raise ValueError(f"{self.checkpoint_path} was written with strategy {saved or 'none'!r}, the server runs "
                             f"{self.settings.strategy or 'none'!r}; use another --state-dir")
        self.segment.module.load_state_dict(state["module"])
        self.segment.optimizer.load_state_dict(state["optimizer"])
        self.applied_steps = int(state["applied_steps"])
        now = time.monotonic()
        for sid, s in state["sessions"].items():
            cache = {k: _Cached(k, int(c["step"]), c["body_sha"], c["response"].numpy().tobytes())
                     for k, c in s["cache"].items()}
            self.sessions[sid] = Session(id=sid, token_hash=s["token_hash"], next_step=int(s["next_step"]),
                                         last_seen=now, cache=cache)
        if self.rounds is not None:
            self.rounds.load_state_dict(state["strategy"])
        return self.applied_steps

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return {"sessions_active": len(self.sessions), "steps_applied_total": self.applied_steps,
                    **{f"{k}_total": v for k, v in self.counters.items()},
                    **(self.rounds.metrics() if self.rounds is not None else {})}
