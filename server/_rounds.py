"""Multi-client strategies over HTTP: iteration barriers, round ends, device-weight exchange.

Steps are numbered in one of two ways (docs/protocol.md):

* **global iterations** (PSL, SFL, SGLR, AdaSplit): step ``n`` in a URL is the server's iteration
  ``n``. Its participants are fixed when it opens (``Strategy.participants``). Batching strategies
  collect the iteration's forward (single split: train) calls until every participant has arrived
  or ``round_timeout_s`` has passed, make one strategy call, and answer each waiting request with
  its own slice; the same again for backward. Non-batching ones (AdaSplit) serve each selected
  client on arrival.
* **per-session steps** (SSL): the default protocol with B's lease; B's calls go through the
  strategy one client at a time, and device weights are relayed with ``device-state`` / ``turn``.

A round ends when every client of the round has called ``rounds/{r}/end`` (or the timeout has
passed since the first did): one ``Strategy.end_round`` call, each client gets the device weights
it must load (SFL, FedAvg: the average; others: none). Exactly once: a repeated call with the
same body returns the stored response.

``RoundHost`` is the barrier :class:`~._scheduler.StepScheduler` (and SSL's ``SessionSteps``). Every strategy
call that changes state goes to the step log with its tensors, in the same transaction as the replies of
the devices it answers (``Host.commit_applied``), and :meth:`RoundHost.replay` re-applies it on restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch

from splitexport import UnsafeUpdate
from splitexport.protocol import ErrorCode, ServerReply
from splitexport.strategies import STRATEGIES, Strategy, make_strategy

from ._errors import APIError
from ._faults import fault
from ._scheduler import GradDecoder, Host
from ._session import Session
from ._store import LogEvent, StateError, StepRecord, pack

if TYPE_CHECKING:
    from ._state import ServerState
from ._wire import encode, encode_reply

T = TypeVar("T")

HISTORY = 256
"""How many closed iterations keep their participant list for late status calls."""


class ReplicaHook(Protocol):
    """B replicated over ranks (:mod:`._replicas`): called on B's thread before each collective strategy call."""

    def enter(self, kind: str, index: int) -> None: ...


@dataclass
class _Arrival:
    payload: tuple[Any, ...]
    transport: type
    body_sha: str


@dataclass
class _Barrier:
    """Calls collected until every expected client has arrived or the timeout has passed."""

    expected: list[str]
    opened: float
    arrived: dict[str, _Arrival] = field(default_factory=dict)
    responses: dict[str, bytes] | None = None
    error: APIError | None = None

    def complete(self) -> bool:
        return all(c in self.arrived for c in self.expected)

    @property
    def done(self) -> bool:
        return self.responses is not None or self.error is not None


@dataclass
class _Iteration:
    index: int
    round: int
    participants: list[str]
    phase: str
    """"forward" then "backward" (double split), or "train" (single split)."""
    barrier: _Barrier
    finished: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    """Non-batching strategies: the participants whose step was refused (in ``finished`` too: done, no step)."""
    out_shapes: dict[str, torch.Size] = field(default_factory=dict)
    closed: bool = False
    opening: dict[str, Any] = field(default_factory=dict)
    """``Strategy.participants``' arguments and result, logged before the iteration's first step."""
    logged: bool = False
    """Its opening is in the step log (or in the snapshot)."""
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """The forward's activations, logged with the backward (the step's inputs)."""


def refused_step(exc: UnsafeUpdate) -> APIError:
    """422 ``non_finite_update`` or ``gradient_too_large`` for a step B refused (and undid)."""
    code = ErrorCode.NON_FINITE_UPDATE if exc.reason == "non_finite" else ErrorCode.GRADIENT_TOO_LARGE
    return APIError.of(code, f"{exc}; the step was not applied")


def build_strategy(state: ServerState) -> Strategy:
    """The configured strategy around B; ``ValueError`` with a clear message for a bad combination."""
    s = state.settings
    assert s.strategy is not None
    if s.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {s.strategy!r}; choose from {', '.join(STRATEGIES)}")
    cls = STRATEGIES[s.strategy]
    if state.split not in cls.splits:
        need = " or ".join(sorted(cls.splits))
        shape = "A | B" if state.split == "single" else "A | B | C"
        raise ValueError(f"strategy {s.strategy!r} needs a {need} split; this bundle is a {state.split} split "
                         f"({shape}): re-partition with {'one --cut' if need == 'single' else 'two --cut'}")
    if s.num_clients is None:
        raise ValueError(f"strategy {s.strategy!r} needs the number of clients: pass --clients N "
                         "(or set SPLITEXPORT_NUM_CLIENTS)")
    config = s.strategy_config(state.bundle.manifest.optimizer.lr)
    return make_strategy(s.strategy, state.segment if cls.needs_server else None, config)


class RoundHost:
    """The strategy layer of the server, on the event loop.

    The bookkeeping of iterations and round ends runs under one :class:`asyncio.Condition`; a request waiting
    at a barrier awaits it (no thread). The strategy's compute runs on B's thread (:class:`~._scheduler.BExecutor`)
    while the condition's lock is held, so it sees the barriers as they were when it fired.
    """

    def __init__(self, state: Host, strategy: Strategy) -> None:
        self.state = state
        self.strategy = strategy
        self.timeout = state.settings.round_timeout_s
        self.num_clients = state.settings.num_clients or 1
        self.expected_sessions = self.num_clients
        """Sessions the first iteration waits for (a replica: its share of the clients)."""
        self.replicas: ReplicaHook | None = None
        self.global_steps = strategy.device_sync != "relay" and (strategy.batches_server or state.split == "single")
        self._cond = asyncio.Condition()
        self.next_iteration = 0
        self.current: _Iteration | None = None
        self.round_clients: list[str] | None = None
        self.end_barrier: _Barrier | None = None
        self.round_left: set[str] = set()
        """Clients done with this round's iterations (no more batches), before their round end."""
        self._history: OrderedDict[int, frozenset[str]] = OrderedDict()
        self._first_open: float | None = None

    # -- info -------------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        """Where training stands (read without the lock: a consistent enough view for status pages)."""
        st = self.strategy
        return {
            "strategy": st.name, "split": self.state.split, "device_sync": st.device_sync,
            "batches_server": st.batches_server, "sends_gradient": st.sends_gradient,
            "needs_server": st.needs_server, "steps": "global" if self.global_steps else "per_session",
            "num_clients": self.num_clients, "client_lr": st.config.client_lr,
            "server_lr": st.server_lr() if st.needs_server else None,
            "alpha": st.config.hyperparameters["alpha"], "phi": st.config.hyperparameters["phi"],
            "round": st.round,
            "next_iteration": self.current.index if self.current else self.next_iteration,
            "round_timeout_s": self.timeout,
        }

    async def status(self, session: Session, step: int) -> dict[str, object]:
        """Whether ``session`` takes part in iteration ``step`` (waits until the iteration opens)."""
        self._need_global("steps/{n}")
        async with self._cond:
            if step in self._history and (self.current is None or self.current.index != step):
                members = self._history[step]
                return {"step": step, "participate": session.id in members, "open": False,
                        "participants": len(members), "round": self.strategy.round}
            it = await self._await_open(session, step)
            return {"step": step, "participate": session.id in it.participants, "open": True,
                    "participants": len(it.participants), "round": it.round, "expected": it.phase}

    # -- global iterations --------------------------------------------------------------------

    async def forward(self, session: Session, step: int, x: torch.Tensor, transport: type, body_sha: str) -> bytes:
        async with self._cond:
            replay = self._replay(session, "forward", step, body_sha)
            if replay is not None:
                return replay
            cur = self.current
            if session.phase == "backward" and cur is not None and cur.phase == "backward" \
                    and session.id in cur.participants:
                raise self._wrong(session, f"step {cur.index} waits for this session's backward")
            it = await self._participant(session, step, "forward")
            return await self._arrive(it, session, _Arrival((x,), transport, body_sha), self._fire_forward)

    async def backward(self, session: Session, step: int, grad: GradDecoder, body_sha: str) -> bytes:
        g, transport = grad()
        async with self._cond:
            replay = self._replay(session, "backward", step, body_sha)
            if replay is not None:
                return replay
            it = self.current
            if it is None or it.index != step or it.phase != "backward" or session.id not in it.participants:
                if session.phase == "backward" and session.next_step == step:
                    session.phase = "forward"
                    session.next_step = self._position()
                    raise APIError(409, "forward_lost", f"iteration {step} is over (server restart or round "
                                   f"timeout); continue at step {session.next_step}", **session.public())
                raise self._wrong(session, f"no backward of step {step} is pending for this session")
            shape = it.out_shapes[session.id]
            if tuple(g.shape) != tuple(shape):
                raise APIError(422, "wrong_batch", f"grad has shape {list(g.shape)}, the forward gave {list(shape)}")
            return await self._arrive(it, session, _Arrival((g,), transport, body_sha), self._fire_backward)

    async def train(self, session: Session, step: int, x: torch.Tensor, y: torch.Tensor, transport: type,
                    body_sha: str) -> bytes:
        async with self._cond:
            replay = self._replay(session, "train", step, body_sha)
            if replay is not None:
                return replay
            it = await self._participant(session, step, "train")
            arrival = _Arrival((x, y), transport, body_sha)
            if self.strategy.batches_server:
                return await self._arrive(it, session, arrival, self._fire_train)
            if session.id in it.refused:
                raise self._wrong(session, f"step {step}'s train was refused; continue at step {it.index + 1}")
            if session.id in it.finished:
                raise APIError(409, "conflicting_retry", f"step {step} train was already applied with another body",
                               **session.public())
            def compute() -> bytes:
                response = encode_reply(self.strategy.train_round({session.id: (x, y)})[session.id], transport)
                event = LogEvent("train", it.index, pack({"x.0": x, "y.0": y}, {"clients": [session.id]}))
                self.state.commit_applied([StepRecord(session.id, "train", step, step + 1, body_sha, response, None)],
                                          [*self._opening(it), event])
                return response

            try:
                response = await self._b(compute)
            except UnsafeUpdate as exc:  # nothing applied: this device's part of the iteration ends without a step
                session.phase, session.next_step = "forward", it.index + 1
                it.refused.add(session.id)
                it.finished.add(session.id)
                if all(c in it.finished for c in it.participants):
                    await self._close(it)
                raise refused_step(exc) from exc
            self._finish(session, "train", step, body_sha, response)
            it.finished.add(session.id)
            self._count_step()
            if all(c in it.finished for c in it.participants):
                await self._close(it)
            return response

    # -- round ends ---------------------------------------------------------------------------

    async def end_round(self, session: Session, round_index: int, arrays: dict[str, np.ndarray], num_samples: int,
                        body_sha: str) -> bytes:
        """The device weights this client must load after round ``round_index`` (empty: keep its own)."""
        async with self._cond:
            replay = self.state.exactly_once.replay(session, "end", round_index, body_sha,
                                                    what=f"round {round_index} end")
            if replay is not None:
                return replay
            if round_index != self.strategy.round:
                raise APIError(409, "wrong_round", f"the server is in round {self.strategy.round}, got round "
                               f"{round_index}", round=self.strategy.round, **session.public())
            if session.phase == "backward":
                raise self._wrong(session, "finish the pending backward before ending the round")
            if self.round_clients is None:
                self.round_clients = self._clients()
            if session.id not in self.round_clients:
                raise APIError(409, "not_in_round", f"this session joined after round {round_index} began; it "
                               f"takes part from round {round_index + 1}", round=round_index)
            states = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
            for k, t in states.items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise APIError(422, "non_finite", f"device state {k!r} contains NaN or Inf values", tensor=k)
            bar = self.end_barrier
            if bar is None:
                bar = self.end_barrier = _Barrier(list(self.round_clients), time.monotonic())
            self._check_like(bar, session.id, states)
            known = bar.arrived.get(session.id)
            if known is not None and known.body_sha != body_sha:
                raise APIError(409, "conflicting_retry", f"round {round_index} end was already sent with another body")
            if known is None:
                bar.arrived[session.id] = _Arrival((states, num_samples), np.float32, body_sha)
                await self._leave_iteration(session.id)
            return await self._wait(bar, session, lambda: self._fire_end(bar, round_index))

    async def leave_round(self, session: Session, round_index: int) -> None:
        """This client has no more batches in round ``round_index``: iterations stop waiting for it."""
        async with self._cond:
            if round_index != self.strategy.round:
                raise APIError(409, "wrong_round", f"the server is in round {self.strategy.round}, got round "
                               f"{round_index}", round=self.strategy.round, **session.public())
            if session.phase == "backward":
                raise self._wrong(session, "finish the pending backward before leaving the round")
            self.round_left.add(session.id)
            await self._leave_iteration(session.id)

    async def relayed_state(self, session: Session) -> bytes:
        """SSL: the device weights to load before this client's turn (empty: keep its own)."""
        self._need_relay()
        async with self._cond:
            return encode(dict(self.strategy.device_state_for(session.id) or {}))

    async def end_turn(self, session: Session, arrays: dict[str, np.ndarray]) -> None:
        """SSL: this client's weights after its turn, handed to the next client."""
        self._need_relay()
        async with self._cond:
            states = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
            event = LogEvent("turn", 0, pack(states, {"client": session.id}))

            def compute() -> None:
                self.strategy.end_turn(session.id, states)
                self.state.commit_applied([], [event])

            await self._b(compute)

    async def observe(self, session: Session, metrics: Mapping[str, float]) -> None:
        if type(self.strategy).observe is Strategy.observe:
            return  # the strategy ignores feedback: nothing to do or to log
        async with self._cond:
            event = LogEvent("observe", 0, pack({}, {"client": session.id, "metrics": dict(metrics)}))

            def compute() -> None:
                self.strategy.observe(session.id, metrics)
                self.state.commit_applied([], [event])

            await self._b(compute)

    # -- per-session steps (SSL: the lease scheduler's steps, B's calls through the strategy) -----

    def b_forward(self, session: Session, x: torch.Tensor) -> torch.Tensor:
        return self.strategy.forward_round({session.id: x})[session.id]

    def b_backward(self, session: Session, step: int, body_sha: str, x: torch.Tensor, g: torch.Tensor,
                   transport: type) -> bytes:
        try:
            grad = self.strategy.backward_round({session.id: g})[session.id]
        except UnsafeUpdate as exc:
            raise refused_step(exc) from exc
        response = encode({"grad": grad}, transport)
        event = LogEvent("iteration", step, pack({"x.0": x, "g.0": g}, {"clients": [session.id]}))
        self.state.commit_step(session, "backward", step, body_sha, response, None, event)
        return response

    def b_train(self, session: Session, step: int, body_sha: str, x: torch.Tensor, y: torch.Tensor,
                transport: type) -> bytes:
        try:
            reply: ServerReply = self.strategy.train_round({session.id: (x, y)})[session.id]
        except UnsafeUpdate as exc:
            raise refused_step(exc) from exc
        response = encode_reply(reply, transport)
        event = LogEvent("train", step, pack({"x.0": x, "y.0": y}, {"clients": [session.id]}))
        self.state.commit_step(session, "train", step, body_sha, response, None, event)
        return response

    def b_evaluate(self, session: Session, x: torch.Tensor) -> torch.Tensor:
        return self.strategy.evaluate(session.id, x)

    async def evaluate(self, session: Session, x: torch.Tensor) -> torch.Tensor:
        return await self._b(lambda: self.b_evaluate(session, x))

    def drop(self, session_id: str) -> None:
        """A closed session holds nothing here: a barrier proceeds without it at its timeout."""

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """For a snapshot (on B's thread): the strategy, the next iteration, and the open one's members (its
        ``Strategy.participants`` call is in the strategy's state now, so the log will not repeat it)."""
        it = self.current
        current = None
        if it is not None:
            it.logged = True
            current = {"index": it.index, "round": it.round, "participants": list(it.participants),
                       "finished": sorted(it.finished)}
        strategy = self.strategy.state_dict()
        strategy.pop("server", None)  # B and its optimizer: the snapshot holds them once, beside this
        strategy.pop("optimizer", None)
        return {"name": self.strategy.name, "strategy": strategy,
                "next_iteration": self.current.index if self.current else self.next_iteration, "current": current}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """After B and its optimizer are restored (they are not part of ``state``)."""
        strategy = dict(state["strategy"])
        server = self.strategy.server
        if server is not None and "server" not in strategy:
            strategy["server"] = server.module.state_dict()
            strategy["optimizer"] = server.optimizer.state_dict()
        self.strategy.load_state_dict(strategy)
        self.next_iteration = int(state["next_iteration"])
        self._first_open = time.monotonic()
        cur = state.get("current")
        self.current = None
        if cur is not None:
            self._restore_iteration(int(cur["index"]), int(cur["round"]), list(cur["participants"]))
            assert self.current is not None
            self.current.finished = set(cur["finished"])

    def replay(self, kind: str, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Re-apply one logged strategy call on restart (before the server answers anything)."""
        st, clients = self.strategy, list(meta.get("clients", []))
        if kind == "open":
            members = st.participants(int(meta["round"]), list(meta["eligible"]))
            if members != meta["members"]:
                raise StateError(f"replaying the step log diverged at iteration {step} (participants {members}, "
                                 f"logged {meta['members']}); use another --state-dir")
            self._restore_iteration(step, int(meta["round"]), members)
        elif kind == "iteration":
            st.forward_round({c: tensors[f"x.{i}"] for i, c in enumerate(clients)})
            st.backward_round({c: tensors[f"g.{i}"] for i, c in enumerate(clients)})
            self.state.count_step()
        elif kind == "train":
            st.train_round({c: (tensors[f"x.{i}"], tensors[f"y.{i}"]) for i, c in enumerate(clients)})
            self.state.count_step()
            if self.current is not None and self.current.index == step:
                self.current.finished.update(clients)
        elif kind == "end":
            states = {c: {k.partition(".")[2]: v for k, v in tensors.items() if k.partition(".")[0] == str(i)}
                      for i, c in enumerate(clients)}
            st.end_round(states, dict(zip(clients, meta["num_samples"], strict=True)))
        elif kind == "turn":
            st.end_turn(str(meta["client"]), tensors)
        elif kind == "observe":
            st.observe(str(meta["client"]), meta["metrics"])
        elif kind != "close":
            raise StateError(f"the step log holds an entry of unknown kind {kind!r}; use another --state-dir")
        if kind == "close" or meta.get("close"):
            members = self.current.participants if self.current is not None else []
            self._history[step] = frozenset(members)
            self.current = None
            self.next_iteration = step + 1

    def _restore_iteration(self, index: int, round_index: int, members: list[str]) -> None:
        phase = "train" if self.state.split == "single" else "forward"
        self.current = _Iteration(index, round_index, list(members), phase, _Barrier(list(members), time.monotonic()),
                                  logged=True)

    def metrics(self) -> dict[str, float]:
        waiting = sum(len(b.arrived) for b in (self.current.barrier if self.current else None, self.end_barrier)
                      if b is not None and not b.done)
        return {"rounds_completed_total": self.strategy.round,
                "iterations_total": self.current.index if self.current else self.next_iteration,
                "barrier_waiting": waiting}

    # -- internals ----------------------------------------------------------------------------

    async def _b(self, fn: Callable[[], T]) -> T:
        """``fn`` on B's thread (the lock stays held: nothing else changes the strategy meanwhile)."""
        return await self.state.executor.run(fn)

    async def _sleep(self, seconds: float) -> None:
        """Release the lock until a barrier changes or ``seconds`` pass (an await, not a thread)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cond.wait(), max(seconds, 0.0))

    def _clients(self) -> list[str]:
        """The open sessions in the order they were opened (the strategy's client order)."""
        return [s.id for s in sorted(self.state.sessions.values(), key=lambda s: s.opened)]

    def _need_global(self, call: str) -> None:
        if not self.global_steps:
            raise APIError(400, "wrong_call", f"strategy {self.strategy.name!r} numbers steps per session; "
                           f"{call} is for strategies with global iterations")

    def _need_relay(self) -> None:
        if self.strategy.device_sync != "relay":
            raise APIError(400, "wrong_call", f"strategy {self.strategy.name!r} does not relay device weights")

    def _replay(self, session: Session, kind: str, step: int, body_sha: str) -> bytes | None:
        return self.state.exactly_once.replay(session, kind, step, body_sha)

    def _position(self) -> int:
        return self.current.index if self.current is not None else self.next_iteration

    def _wrong(self, session: Session, message: str) -> APIError:
        if session.phase == "forward":
            session.next_step = max(session.next_step, self._position())
        return APIError(409, "wrong_step", message, **session.public())

    async def _participant(self, session: Session, step: int, phase: str) -> _Iteration:
        it = await self._await_open(session, step)
        if session.id not in it.participants:
            why = "was not selected for" if session.id in (self.round_clients or []) else "is not part of"
            raise APIError(409, "not_in_round", f"this session {why} iteration {step} (round {it.round})",
                           round=it.round, **session.public())
        if it.phase != phase:
            raise self._wrong(session, f"iteration {step} is in its {it.phase} phase, got {phase}")
        return it

    async def _await_open(self, session: Session, step: int) -> _Iteration:
        """Iteration ``step``, opening it when it is next; waits while the one before is still running."""
        deadline = time.monotonic() + 2 * self.timeout
        while True:
            await self._tick()
            cur = self.current
            position = self._position()
            if cur is not None and cur.index == step:
                return cur
            if step < position:
                if step in self._history and session.id not in self._history[step]:
                    raise APIError(409, "not_in_round", f"this session was not part of iteration {step}",
                                   **session.public())
                raise self._wrong(session, f"iteration {step} is over; the server is at iteration {position}")
            if step > position + (1 if cur is not None else 0):
                raise self._wrong(session, f"iteration {step} is ahead; the server is at iteration {position}")
            if cur is None and self._can_open():
                return await self._open(step)
            now = time.monotonic()
            if now >= deadline:
                raise APIError(503, "busy", f"iteration {step} has not opened yet; retry", retry_after_s=1)
            await self._sleep(min(deadline, self._next_deadline()) - now + 0.005)

    def _can_open(self) -> bool:
        if self._first_open is None:
            self._first_open = time.monotonic()
        return len(self.state.sessions) >= self.expected_sessions or time.monotonic() >= self._first_open + self.timeout

    async def _open(self, step: int) -> _Iteration:
        self._first_open = self._first_open or time.monotonic()
        if self.round_clients is None:
            self.round_clients = self._clients()
        ended = self.end_barrier.arrived if self.end_barrier is not None else {}
        eligible = [c for c in self.round_clients
                    if c not in ended and c not in self.round_left and c in self.state.sessions]
        members = self.strategy.participants(self.strategy.round, eligible)
        phase = "train" if self.state.split == "single" else "forward"
        it = _Iteration(step, self.strategy.round, list(members), phase, _Barrier(list(members), time.monotonic()),
                        opening={"round": self.strategy.round, "eligible": eligible, "members": list(members)})
        self.current = it
        if not it.participants:
            await self._close(it)
        return it

    def _next_deadline(self) -> float:
        deadlines = [b.opened + self.timeout for b in (self.current.barrier if self.current else None,
                                                       self.end_barrier) if b is not None]
        return min(deadlines, default=time.monotonic() + self.timeout)

    async def _tick(self) -> None:
        """Proceed with the clients present when a barrier's time is up (nobody else may be waiting in it)."""
        now = time.monotonic()
        it = self.current
        if it is not None and not it.closed and now >= it.barrier.opened + self.timeout:
            if not self.strategy.batches_server or (it.phase == "forward" and not it.barrier.arrived):
                await self._close(it)
            elif not it.barrier.done:
                fire = {"forward": self._fire_forward, "backward": self._fire_backward, "train": self._fire_train}
                await self._fire(it.barrier, lambda: fire[it.phase](it))
        bar = self.end_barrier
        if bar is not None and not bar.done and now >= bar.opened + self.timeout:
            await self._fire(bar, lambda: self._fire_end(bar, self.strategy.round))

    async def _arrive(self, it: _Iteration, session: Session, arrival: _Arrival,
                      fire: Callable[[_Iteration], Awaitable[None]]) -> bytes:
        bar = it.barrier
        known = bar.arrived.get(session.id)
        if known is not None and known.body_sha != arrival.body_sha:
            raise APIError(409, "conflicting_retry", f"step {it.index} {it.phase} is waiting with another body",
                           **session.public())
        if known is None:  # no wake-up: the last arrival fires the barrier itself
            bar.arrived[session.id] = arrival
            session.next_step = it.index
        return await self._wait(bar, session, lambda: fire(it))

    async def _wait(self, bar: _Barrier, session: Session, fire: Callable[[], Awaitable[None]]) -> bytes:
        """Until ``bar`` has fired: the last arrival (or the first caller after the timeout) fires it."""
        while not bar.done:
            now = time.monotonic()
            if bar.complete() or now >= bar.opened + self.timeout:
                await self._fire(bar, fire)
                break
            await self._tick()
            if bar.done:
                break
            await self._sleep(min(bar.opened + self.timeout, self._next_deadline()) - now + 0.005)
        if bar.error is not None:
            raise bar.error
        assert bar.responses is not None
        response = bar.responses.get(session.id)
        if response is None:
            raise APIError(409, "not_in_round", "the barrier proceeded without this session (round timeout)",
                           **session.public())
        return response

    async def _fire(self, bar: _Barrier, fire: Callable[[], Awaitable[None]]) -> None:
        try:
            await fire()
        except APIError as exc:
            bar.error = exc
        except Exception as exc:  # noqa: BLE001 - a failing strategy call fails the whole barrier, not the server
            bar.error = refused_step(exc) if isinstance(exc, UnsafeUpdate) else APIError.of(
                ErrorCode.STRATEGY_FAILED, f"{type(exc).__name__}: {exc}")
            it = self.current
            if it is not None and it.barrier is bar:  # the iteration ends without a step; devices go on at the next
                await self._b(self.state.segment.discard_pending)
                for c in it.participants:
                    s = self.state.sessions.get(c)
                    if s is not None:
                        s.phase, s.next_step = "forward", it.index + 1
                await self._close(it)
        finally:
            self._cond.notify_all()

    def _present(self, it: _Iteration) -> list[str]:
        return [c for c in it.participants if c in it.barrier.arrived]

    async def _fire_forward(self, it: _Iteration) -> None:
        bar, present = it.barrier, self._present(it)
        if not present:
            await self._close(it)
            bar.responses = {}
            return

        def compute() -> tuple[dict[str, torch.Size], dict[str, bytes]]:
            outs = self.strategy.forward_round({c: bar.arrived[c].payload[0] for c in present})
            return ({c: outs[c].shape for c in present},
                    {c: encode({"output": outs[c]}, bar.arrived[c].transport) for c in present})

        it.out_shapes, responses = await self._b(compute)
        bar.responses = responses
        it.inputs = {c: bar.arrived[c].payload[0] for c in present}
        for c in present:
            s = self.state.sessions.get(c)
            if s is not None:
                self.state.exactly_once.record(s, "forward", it.index, bar.arrived[c].body_sha, responses[c],
                                               advance=False)
                s.phase, s.next_step = "backward", it.index
        it.participants = present
        it.phase = "backward"
        it.barrier = _Barrier(list(present), time.monotonic())

    async def _fire_backward(self, it: _Iteration) -> None:
        bar = it.barrier

        def compute() -> dict[str, bytes]:
            grads = {c: bar.arrived[c].payload[0] if c in bar.arrived else torch.zeros(it.out_shapes[c])
                     for c in it.participants}
            if self.replicas is not None:
                self.replicas.enter("iteration", it.index)
            grads_in = self.strategy.backward_round(grads)
            responses = {c: encode({"grad": grads_in[c], **self._shared(c)}, a.transport)
                         for c, a in bar.arrived.items()}
            names = list(grads)
            tensors = {**{f"x.{i}": it.inputs[c] for i, c in enumerate(names)},
                       **{f"g.{i}": grads[c] for i, c in enumerate(names)}}
            event = LogEvent("iteration", it.index, pack(tensors, {"clients": names, "close": True}))
            self.state.commit_applied(self._rows(it, "backward", bar, responses), [*self._opening(it), event])
            return responses

        bar.responses = await self._b(compute)
        self._settle(it, "backward", bar)
        self._count_step()
        await self._close(it, logged=True)

    async def _fire_train(self, it: _Iteration) -> None:
        bar, present = it.barrier, self._present(it)
        if not present:
            bar.responses = {}
            await self._close(it)
            return

        def compute() -> dict[str, bytes]:
            if self.replicas is not None:
                self.replicas.enter("iteration", it.index)
            replies = self.strategy.train_round({c: bar.arrived[c].payload for c in present})
            responses = {c: encode_reply(replies[c], bar.arrived[c].transport, self._shared(c)) for c in present}
            tensors = {**{f"x.{i}": bar.arrived[c].payload[0] for i, c in enumerate(present)},
                       **{f"y.{i}": bar.arrived[c].payload[1] for i, c in enumerate(present)}}
            event = LogEvent("train", it.index, pack(tensors, {"clients": present, "close": True}))
            self.state.commit_applied(self._rows(it, "train", bar, responses), [*self._opening(it), event])
            return responses

        bar.responses = await self._b(compute)
        self._settle(it, "train", bar)
        self._count_step()
        await self._close(it, logged=True)

    async def _fire_end(self, bar: _Barrier, round_index: int) -> None:
        present = [c for c in bar.expected if c in bar.arrived] + [c for c in bar.arrived if c not in bar.expected]
        states = {c: bar.arrived[c].payload[0] for c in present}
        num_samples = {c: int(bar.arrived[c].payload[1]) for c in present}
        if not self.strategy.averages_device_states():  # the round-end rule: no weights to average, none logged
            states = {c: {} for c in present}

        def compute() -> dict[str, bytes]:
            round_before = self.strategy.round
            try:
                if self.replicas is not None:
                    self.replicas.enter("end", round_index)
                out = self.strategy.end_round(states, num_samples)
            except Exception:  # the round is not over: its devices get the error and may end it again
                self.strategy.round = round_before
                self.end_barrier = None
                raise
            responses = {c: encode(dict(out.get(c, {}))) for c in present}
            tensors = {f"{i}.{k}": t for i, c in enumerate(present) for k, t in states[c].items()}
            event = LogEvent("end", round_index, pack(tensors, {"clients": present,
                                                                "num_samples": [num_samples[c] for c in present]}))
            rows = [StepRecord(c, "end", round_index, s.next_step, bar.arrived[c].body_sha, responses[c], None)
                    for c in present if (s := self.state.sessions.get(c)) is not None]
            self.state.commit_applied(rows, [event])
            return responses

        bar.responses = await self._b(compute)
        for c in present:
            s = self.state.sessions.get(c)
            if s is not None:
                self.state.exactly_once.record(s, "end", round_index, bar.arrived[c].body_sha, bar.responses[c],
                                               advance=False)
        self.end_barrier = None
        self.round_clients = None
        self.round_left.clear()
        await self._b(self.state.checkpoint)  # once a round (not per step): the round's log entries go
        fault("after_round_end", self.state.applied_steps)

    def _settle(self, it: _Iteration, kind: str, bar: _Barrier) -> None:
        assert bar.responses is not None
        for c in it.participants:
            s = self.state.sessions.get(c)
            if s is None:
                continue
            if c in bar.responses:
                self._finish(s, kind, it.index, bar.arrived[c].body_sha, bar.responses[c])
            else:
                s.phase, s.next_step = "forward", it.index + 1

    def _finish(self, session: Session, kind: str, step: int, body_sha: str, response: bytes) -> None:
        self.state.exactly_once.record(session, kind, step, body_sha, response)

    def _rows(self, it: _Iteration, kind: str, bar: _Barrier, responses: dict[str, bytes]) -> list[StepRecord]:
        """The iteration's devices for the group commit: reply and next step (or only the next step)."""
        return [StepRecord(c, kind, it.index, it.index + 1, bar.arrived[c].body_sha if c in responses else "",
                           responses.get(c), None) for c in it.participants if c in self.state.sessions]

    def _opening(self, it: _Iteration) -> list[LogEvent]:
        """The iteration's ``Strategy.participants`` call for the log, once, before its first step."""
        if it.logged:
            return []
        it.logged = True
        return [LogEvent("open", it.index, pack({}, it.opening))]

    def _count_step(self) -> None:
        self.state.count_step()

    async def _close(self, it: _Iteration, logged: bool = False) -> None:
        """Close the iteration (``logged``: its closing is in the log already, with its B step)."""
        if it.closed:
            return
        it.closed = True
        if not logged:
            events = [*self._opening(it), LogEvent("close", it.index, pack({}, {}))]
            await self._b(lambda: self.state.commit_applied([], events))
        self._history[it.index] = frozenset(it.participants)
        while len(self._history) > HISTORY:
            self._history.popitem(last=False)
        if self.current is it:
            self.current = None
            self.next_iteration = it.index + 1
        if self.state.snapshot_due:
            await self._b(self.state.checkpoint)
        self._cond.notify_all()

    async def _leave_iteration(self, client: str) -> None:
        """A client that ended its round is no longer expected in the open iteration."""
        it = self.current
        if it is None or client not in it.participants or client in it.barrier.arrived or client in it.finished:
            return
        if it.phase in ("forward", "train"):
            it.participants.remove(client)
            it.barrier.expected.remove(client)
            if not it.participants or (not self.strategy.batches_server
                                       and all(c in it.finished for c in it.participants)):
                await self._close(it)
            elif it.barrier.complete():  # the clients waiting in it can go on now
                self._cond.notify_all()

    def _check_like(self, bar: _Barrier, client: str, states: dict[str, torch.Tensor]) -> None:
        """Every client of a round must send the same tensors (names, shapes, dtypes)."""
        for other, arrival in bar.arrived.items():
            if other == client:
                continue
            ref: dict[str, torch.Tensor] = arrival.payload[0]
            same = ref.keys() == states.keys() and all(
                ref[k].shape == states[k].shape and ref[k].dtype == states[k].dtype for k in ref)
            if not same:
                raise APIError(422, "state_mismatch", "the device state differs in names, shapes or dtypes from "
                               "another client's in this round", expected=sorted(ref)[:20], got=sorted(states)[:20])
            return

    def _shared(self, client: str) -> dict[str, torch.Tensor]:
        """``shared: [1]`` when the client's gradient is the one broadcast to several clients (SplitAvg)."""
        return {"shared": torch.ones(1, dtype=torch.uint8)} if client in self.strategy.last_broadcast else {}
