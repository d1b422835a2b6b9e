"""Segment B replicated over ``torch.distributed`` ranks, one HTTP server per rank (docs/scaling.md).

Each rank serves its own devices. A session is opened on the replica that ``POST /v1/sessions``
assigns it to (round-robin; a ``307`` names the other replica, whose session ids start with
``r<rank>-``, so a load balancer can route ``/v1/sessions/r<k>-...`` by prefix). Every global
iteration and round end is one collective step over all ranks:

1. :meth:`Replicas.enter` exchanges each rank's position ``(round, iteration | end)``. A rank that is
   past the lowest position (its devices had no batch in that iteration, or have all ended the
   round) takes part in it with nothing of its own (:meth:`~splitexport.strategies._reduce.Collectives.empty_step`),
   so every rank makes the same collectives in the same order and takes the same optimizer step.
2. The strategy call then all-reduces B's gradient, SplitAvg and round-end averages
   (:mod:`splitexport.strategies._reduce`).

Every collective has the process group's timeout; a failure (a dead or stalled rank) marks this
replica lost: it answers ``503 replica_lost`` from then on, and the job must be restarted. At
startup the ranks compare their restored positions; ranks behind take B, its optimizer and the
strategy state from the most advanced rank, so every rank resumes at the same iteration.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import torch
import torch.distributed as dist
from fastapi import APIRouter, FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from splitexport.protocol import IDEMPOTENCY_KEY, ErrorCode
from splitexport.strategies import CollectiveError, Collectives

from ._errors import APIError

if TYPE_CHECKING:
    from ._state import ServerState

log = logging.getLogger("splitexport.server")

REPLICATED = ("psl", "sfl", "sglr")
"""Strategies with global iterations whose B step can be split over ranks."""


def refusal(strategy: str | None, clients: int | None, replicas: int) -> str | None:
    """Why ``--replicas`` cannot run this configuration (one line), or None."""
    if strategy is None:
        return ("--replicas needs a strategy with global iterations (--strategy psl, sfl or sglr); without a strategy "
                "devices train one shared B one after another, which cannot be split over replicas")
    if strategy not in REPLICATED:
        why = {"ssl": "SSL trains B on one device at a time, in turn, so there is nothing to run in parallel",
               "adasplit": "AdaSplit serves one device at a time through its own mask and selects devices globally "
                           "by UCB",
               "fedavg": "FedAvg trains no server segment"}.get(strategy, "it is not a global-iteration strategy")
        return f"--replicas does not support --strategy {strategy}: {why}; use psl, sfl or sglr"
    if clients is not None and clients < replicas:
        return f"--replicas {replicas} needs at least as many devices (--clients {clients}): every replica needs one"
    return None


def local_share(clients: int, world_size: int, rank: int) -> int:
    """How many of ``clients`` devices round-robin assignment gives ``rank`` (the first iteration waits for them)."""
    return clients // world_size + (1 if rank < clients % world_size else 0)


def advertised_url(host: str, port: int) -> str:
    """This replica's base URL for devices: ``SPLITEXPORT_REPLICA_URL`` if set, else from the bind address."""
    explicit = os.environ.get("SPLITEXPORT_REPLICA_URL")
    if explicit:
        return explicit.rstrip("/")
    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{name}]' if ':' in name else name}:{port}"


class Replicas:
    """This rank's view of the replicated B: collectives, the other replicas' URLs, the lost flag."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, url: str, device: str = "cpu") -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.url = url
        self.comm = Collectives(rank, world_size, timeout_s, device)
        self.urls: list[str] = [url]
        self.lost: str | None = None
        """Why this replica stopped (a failed collective); every strategy call answers 503 from then on."""
        self.resumed: dict[str, Any] | None = None
        """How startup aligned the ranks' restored states (None: they agreed)."""
        self._state: ServerState | None = None
        self._cursor = rank
        self._assigned: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def from_env(cls, timeout_s: float, url: str, device: str = "cpu") -> Replicas:
        """Join the process group described by torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
        ``MASTER_PORT``) and learn every replica's URL."""
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        backend = "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        self = cls(rank, world, timeout_s, url, device)
        self.urls = [str(u) for u in self._collective(self.comm.all_gather_object, url)]
        return self

    # -- wiring into the server ---------------------------------------------------------------------

    def attach(self, state: ServerState) -> None:
        """Hook this rank into the server's strategy layer, then align the restored states of all ranks."""
        rounds = state.rounds
        name = rounds.strategy.name if rounds is not None else None
        why = refusal(name, state.settings.num_clients, self.world_size)
        if why is not None or rounds is None:
            raise ValueError(why or "--replicas needs a strategy")
        self._state = state
        rounds.strategy.reducer = self.comm
        state.segment.grad_hook = self._reduce_gradients
        rounds.replicas = self
        rounds.expected_sessions = local_share(rounds.num_clients, self.world_size, self.rank)
        state.session_prefix = f"r{self.rank}-"
        state.open_extra = {"replica": self.rank, "url": self.url}
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in state.segment.module.modules()):
            log.warning("B has BatchNorm: each replica normalises over its own devices' batch and keeps its own "
                        "running statistics (as DDP without SyncBatchNorm); the weights stay identical")
        self._align(state)

    def install(self, app: FastAPI) -> None:
        """``GET /v1/replicas`` and the session assignment (307 to another replica) on ``POST /v1/sessions``."""
        router = APIRouter(prefix="/v1", tags=["replicas"])

        @router.get("/replicas")
        async def replicas(request: Request) -> dict[str, object]:
            """This replica and the others; 503 ``replica_lost`` once a collective failed (a health check)."""
            self.check()
            return self.info()

        app.include_router(router)
        app.add_middleware(AssignSessions, replicas=self)

    def info(self) -> dict[str, object]:
        return {"rank": self.rank, "world_size": self.world_size, "replicas": list(self.urls),
                "collective_timeout_s": self.timeout_s, "lost": self.lost, "resumed": self.resumed}

    def assign(self, key: str | None) -> int:
        """The replica a new session goes to: round-robin; the same ``Idempotency-Key`` gets the same replica."""
        if key is not None and key in self._assigned:
            return self._assigned[key]
        target = self._cursor % self.world_size
        self._cursor += 1
        if key is not None:
            self._assigned[key] = target
            while len(self._assigned) > 4096:
                self._assigned.popitem(last=False)
        return target

    # -- the collective steps --------------------------------------------------------------------------

    def check(self) -> None:
        if self.lost is not None:
            raise APIError.of(ErrorCode.REPLICA_LOST, self.lost, rank=self.rank, retry_after_s=5)

    def enter(self, kind: str, index: int) -> None:
        """Called (under the server lock) before this rank's part of iteration ``index`` (``kind="iteration"``) or
        of the end of round ``index`` (``kind="end"``); returns when every rank is at this step."""
        self.check()
        state = self._state
        assert state is not None and state.rounds is not None
        rounds = state.rounds
        mine = (rounds.strategy.round, 0, index) if kind == "iteration" else (index, 1, 0)
        while True:
            position = rounds.current.index if rounds.current is not None else rounds.next_iteration
            keys: list[tuple[tuple[int, int, int], int]] = self._collective(self.comm.all_gather_object,
                                                                            (mine, position))
            low = min(tuple(k) for k, _ in keys)
            if low == mine:
                if kind == "end":  # every rank is at the round end: continue the numbering from the furthest
                    rounds.next_iteration = max(rounds.next_iteration, *(p for _, p in keys))
                return
            self._empty_iteration(low[2])

    def _empty_iteration(self, index: int) -> None:
        state = self._state
        assert state is not None and state.rounds is not None
        rounds = state.rounds
        self._collective(self.comm.empty_step, rounds.strategy)
        if rounds.current is None and rounds.next_iteration <= index:
            rounds.next_iteration = index + 1
        state.count_step()
        if state.snapshot_due:
            state.checkpoint()

    def _reduce_gradients(self, params: Sequence[torch.Tensor], batch: int) -> None:
        self._collective(self.comm.reduce_gradients, params, batch)

    def _collective(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except CollectiveError as exc:
            self.lost = (f"replica {self.rank} lost its peers: {exc}; restart the job (every rank resumes from its "
                         "last snapshot)")
            log.error("%s", self.lost)
            if self._state is not None:
                self._state.segment.discard_pending()
            raise APIError.of(ErrorCode.REPLICA_LOST, self.lost, rank=self.rank, retry_after_s=5) from exc

    # -- durability ----------------------------------------------------------------------------------

    def _align(self, state: ServerState) -> None:
        """Every rank resumes at the same iteration: ranks behind load B, its optimizer and the strategy state of
        the most advanced rank (a crash can leave one rank's snapshot an iteration ahead of another's)."""
        rounds = state.rounds
        assert rounds is not None
        mine = (rounds.strategy.round, rounds.next_iteration, state.applied_steps)
        everyone = [tuple(p) for p in self._collective(self.comm.all_gather_object, mine)]
        if len(set(everyone)) == 1:
            return
        src = max(range(self.world_size), key=lambda r: everyone[r])
        payload = None
        if self.rank == src:
            payload = {"module": state.segment.module.state_dict(), "optimizer": state.segment.optimizer.state_dict(),
                       "strategy": rounds.state_dict(), "applied_steps": state.applied_steps}
        got = self._collective(self.comm.broadcast_object, payload, src)
        self.resumed = {"positions": [list(p) for p in everyone], "from_rank": src}
        if everyone[self.rank] != everyone[src]:
            state.segment.module.load_state_dict(got["module"])
            state.segment.optimizer.load_state_dict(got["optimizer"])
            # an iteration the source rank has open holds that rank's sessions: this rank opens its own
            rounds.load_state_dict({**got["strategy"], "current": None})
            state.applied_steps = int(got["applied_steps"])
            state.checkpoint()
            log.warning("replica %d restored (round, iteration, steps) %s; took rank %d's %s", self.rank,
                        everyone[self.rank], src, everyone[src])


class AssignSessions:
    """ASGI middleware: a ``POST /v1/sessions`` that round-robin assigns to another replica gets a ``307`` to that
    replica's ``/v1/sessions?replica=<k>`` (with ``{"replica", "url"}`` in the body); ``?replica=`` opens here."""

    def __init__(self, app: ASGIApp, replicas: Replicas) -> None:
        self.app = app
        self.replicas = replicas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/sessions"
                and "replica" not in parse_qs(scope.get("query_string", b"").decode())):
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            key = headers.get(IDEMPOTENCY_KEY.lower())
            target = self.replicas.assign(f"{headers.get('authorization', '')} {key}" if key else None)
            if target != self.replicas.rank:
                url = self.replicas.urls[target]
                body = json.dumps({"replica": target, "url": url}).encode()
                await send({"type": "http.response.start", "status": 307,
                            "headers": [(b"location", f"{url}/v1/sessions?replica={target}".encode()),
                                        (b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
