"""Where the server's CPU goes while one device steps the MLP (issue 12): the event loop, and B's thread by phase.

    python benchmarks/profile_event_loop.py [--steps 300] [--top 40]

uvicorn serves the app in this process (B on its own thread, one torch thread, checkpoints off); a
client thread sends the same forward/backward bodies as ``bench_server_state.py --only cpu``, after 30
warm-up steps. The event loop's thread is profiled with cProfile (it profiles the thread that enables it;
it inflates Python-heavy code: read the shares, not the absolute times). B's thread is not profiled: its
CPU time (``time.thread_time``) is summed per phase around the functions it runs (B's compute, encoding the
replies and the step's log record, the SQLite commit), unprofiled.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_server_state import Device, make_bundle

from server import ServerSettings, _scheduler, _state, _store, create_app
from splitexport import TorchSegment
from tests._support import free_port

PHASES = {  # B's thread: (owner, function) -> phase
    (TorchSegment, "forward"): "B compute", (TorchSegment, "stage_gradient"): "B compute",
    (TorchSegment, "try_staged"): "B compute + non-finite check", (TorchSegment, "apply_staged"): "B compute",
    (_scheduler, "encode"): "encode replies", (_state, "encode"): "encode replies",
    (_state, "encode_exact"): "encode the log record", (_store.Store, "commit_steps"): "SQLite commit",
}


def time_b_thread(on: threading.Event) -> tuple[dict[str, float], list[float]]:
    """Wrap B's thread's functions (and ``BExecutor.run``'s callables) to sum their thread CPU time while ``on``."""
    phases: dict[str, float] = {}
    total = [0.0]
    for (owner, name), phase in PHASES.items():
        fn = getattr(owner, name)

        def timed(*a: object, _fn: Any = fn, _phase: str = phase, **k: object) -> Any:
            t0 = time.thread_time()
            try:
                return _fn(*a, **k)
            finally:
                if on.is_set():
                    phases[_phase] = phases.get(_phase, 0.0) + time.thread_time() - t0

        setattr(owner, name, timed)
    run = _scheduler.BExecutor.run

    async def run_timed(self: _scheduler.BExecutor, fn: Any) -> Any:
        def call() -> Any:
            t0 = time.thread_time()
            try:
                return fn()
            finally:
                if on.is_set():
                    total[0] += time.thread_time() - t0
        return await run(self, call)

    _scheduler.BExecutor.run = run_timed  # type: ignore[method-assign]
    return phases, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--smoke", action="store_true", help="20 steps, 10 rows: seconds, for CI")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.top = 20, 10
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    bundle = make_bundle(root, "mlp")
    port = free_port()
    settings = ServerSettings(bundle=bundle, state_dir=root / "s", port=port, threads=1, checkpoint_every=1_000_000)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    go, done = threading.Event(), threading.Event()
    b_phases, b_total = time_b_thread(go)

    def device() -> None:
        while not server.started:
            time.sleep(0.05)
        d = Device(f"http://127.0.0.1:{port}", bundle)
        d.run(30)
        go.set()
        time.sleep(0.1)
        d.run(args.steps)
        go.clear()
        done.set()
        server.should_exit = True

    threading.Thread(target=device, daemon=True).start()
    prof = cProfile.Profile()

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not go.is_set():
            await asyncio.sleep(0.01)
        c0 = time.thread_time()
        prof.enable()
        while not done.is_set():
            await asyncio.sleep(0.01)
        prof.disable()
        print(f"event-loop thread CPU per step, profiled: {(time.thread_time() - c0) / args.steps * 1e3:.3f} ms")
        await task

    asyncio.run(serve())
    print(f"B's thread CPU per step: {b_total[0] / args.steps * 1e3:.3f} ms, of which "
          + ", ".join(f"{k} {v / args.steps * 1e3:.3f}" for k, v in sorted(b_phases.items(), key=lambda kv: -kv[1])))
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top // 2)


if __name__ == "__main__":
    main()
