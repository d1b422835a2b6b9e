"""Starting a replicated B (docs/scaling.md): ``splitexport serve --replicas N`` or one rank under torchrun.

* ``splitexport serve bundle/ --strategy psl --clients 8 --replicas 2 --port 8000`` spawns two ranks on this
  machine (``MASTER_ADDR=127.0.0.1``); rank ``r`` serves on ``port + r`` with its state in ``state-dir/rank<r>``.
* ``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m splitexport serve
  bundle/ --distributed --strategy psl --clients 512 --host 0.0.0.0 --port 8000 --tokens T``: each rank reads
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and serves on ``port + LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import sys
from types import FrameType

from ._replicas import refusal
from ._settings import ServerSettings


class LaunchError(ValueError):
    """A replicated start that cannot work (one line for the CLI)."""


def collective_timeout(args: argparse.Namespace, settings: ServerSettings) -> float:
    """``--collective-timeout``, by default long enough for the other replicas' barriers: 2 x round timeout + 30 s."""
    given = getattr(args, "collective_timeout", None)
    return float(given) if given is not None else 2 * settings.round_timeout_s + 30.0


def serve_rank(args: argparse.Namespace, settings: ServerSettings) -> None:
    """Serve this rank of the job described by torchrun's environment variables until stopped."""
    import uvicorn

    from ._app import create_app
    from ._listen import listen
    from ._replicas import Replicas, advertised_url

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LaunchError(f"--distributed runs one rank of a torchrun job: {', '.join(missing)} not set (start it with "
                          "torchrun, or use --replicas N on one machine)")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    port = settings.port + local
    settings = settings.model_copy(update={"port": port, "state_dir": settings.state_dir / f"rank{rank}"})
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    sock = listen(settings.host, port)
    try:
        try:
            replicas = Replicas.from_env(collective_timeout(args, settings), advertised_url(settings.host, port),
                                         settings.device)
        except Exception as exc:  # the rendezvous failed or timed out (a rank that never started, a wrong address)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LaunchError(f"rank {rank} could not join the process group at {os.environ['MASTER_ADDR']}:"
                              f"{os.environ['MASTER_PORT']}: {first}") from exc
        app = create_app(settings, replicas)
        config = uvicorn.Config(app, host=settings.host, port=port, log_level=getattr(args, "log_level", "warning"),
                                timeout_graceful_shutdown=3)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _child(args: argparse.Namespace, settings: ServerSettings, rank: int, world: int, master_port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)})
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM; uvicorn stops on it
    try:
        serve_rank(args, settings)
    except (LaunchError, ValueError) as exc:
        print(f"error: rank {rank}: {exc}", file=sys.stderr)
        sys.exit(2)


def launch(args: argparse.Namespace, settings: ServerSettings) -> int:
    """``--replicas N`` on one machine: N spawned ranks on loopback; returns the first non-zero exit code."""
    world = int(args.replicas)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = int(s.getsockname()[1])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(args, settings, r, world, master_port), name=f"rank{r}")
             for r in range(world)]
    for p in procs:
        p.start()

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:  # a rank that dies leaves the others answering 503 replica_lost until they are stopped
        p.join()
    stopped = (0, -signal.SIGTERM, -signal.SIGINT) if stopping else (0,)  # uvicorn re-raises the signal it stopped on
    return next((int(p.exitcode) for p in procs if p.exitcode not in stopped and p.exitcode is not None), 0)


__all__ = ["LaunchError", "collective_timeout", "launch", "refusal", "serve_rank"]
