"""cProfile of the server's event-loop thread while one device steps the MLP (issue 12).

    python benchmarks/profile_event_loop.py [--steps 300] [--top 40]

uvicorn serves the app in this process (B on its own thread, one torch thread, checkpoints off); a
client thread sends the same forward/backward bodies as ``bench_server_state.py --only cpu``. Only the
event loop's thread is profiled (cProfile profiles the thread that enables it), after 30 warm-up steps.
cProfile inflates Python-heavy code: read the shares, not the absolute times.
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

import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_server_state import Device, make_bundle

from server import ServerSettings, create_app
from tests._support import free_port


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

    def device() -> None:
        while not server.started:
            time.sleep(0.05)
        d = Device(f"http://127.0.0.1:{port}", bundle)
        d.run(30)
        go.set()
        time.sleep(0.1)
        d.run(args.steps)
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
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top // 2)


if __name__ == "__main__":
    main()
