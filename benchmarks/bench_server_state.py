"""What the server's state costs: sessions, durability bytes, per-call CPU (issue 12).

    python benchmarks/bench_server_state.py [--smoke] [--steps 200] [--sessions 5000] [--devices 60]
                                            [--only sessions|bytes|cpu|check|store|healthz|strategy|sessions-open ...] [--json out.json]

``splitexport serve --threads 1`` runs in a child process on loopback; this process is one device
sending fixed forward/backward bodies (batch 32) over one HTTP connection:

* **sessions**: the median step time (forward + backward round trip) of a device on a server with
  1 open session and of one on a server with ``--sessions`` open sessions, both running, step blocks
  alternating between them.
* **durable bytes**: with an MLP whose B has ~10M parameters, the bytes the server process wrote to
  storage per step (``/proc/PID/io`` ``write_bytes``: SQLite WAL, snapshots) and the step time, for
  the default durability (step log + snapshot every 100 steps), a snapshot every step (the cost the
  log avoids), and none (B's step in this process, nothing written).
* **strategy bytes**: PSL with ``--clients 8`` around the ~10M-parameter B: the bytes written and the time per
  iteration (8 devices' forwards at the barrier, then their backwards), with the step log (default) and
  with a snapshot every iteration (``--checkpoint-every 1``: what a strategy server wrote before its calls
  were logged).
* **server CPU per step minus B**: the server process's CPU seconds (``/proc/PID/stat``, 10 ms ticks:
  use enough steps) per step, minus B's CPU time per step measured here in process with one thread,
  interleaved in blocks with the HTTP steps (same B, same thread count), for mlp and resnet_cnn; and minus
  B's CPU per step with the idle gaps B's thread has in the server (half the HTTP step's wall time after the
  forward and after the step: the same compute costs more CPU on a cooled core than back to back);
  ``--compare DIR`` runs a second server from another checkout in the same blocks (before/after).
* **the non-finite check**: B's step in this process with and without ``TorchSegment.try_staged`` (the
  server's refusal of updates that would make a weight or optimizer state non-finite), alternating.
* **store**: one step's commit to the server's SQLite store, CPU and wall time, with its fsync per
  commit (``synchronous=FULL``) and, for reference, without (``NORMAL``).
* **/healthz under contention**: ``--devices`` devices (a child process, asyncio) step B as fast as
  the lease lets them for ``--seconds`` while this process GETs ``/healthz`` every 10 ms on its own
  connection: p50, p99 and max latency (the event loop must never be held by training).
* **sessions-open**: how long the event loop is held per session open and per close (the server's
  ``ServerState`` in this process, ``--sessions-open`` opens by 8 concurrent callers, then their closes): a
  ticker on the loop wakes every millisecond and sums how late it wakes; also the longest stall, the loop
  thread's CPU time, the wall time per call and the store commits per call (group commit). It also runs a checkout whose
  ``open_session`` is still synchronous (the store's commit on the loop): copy this file into it to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.numpy import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine

from splitexport import OptimizerSpec, TorchSegment, load_bundle
from splitexport.models import MLP
from tests._support import ServerProcess, build_bundle

BATCH = 32


def make_bundle(root: Path, name: str) -> Path:
    path = root / name
    if path.exists():
        return path
    model: str | Callable[[], torch.nn.Module] = name if name == "resnet_cnn" else functools.partial(
        MLP, hidden=3162 if name == "mlp10m" else 64)
    cuts = ["layer1", "layer3"] if name == "resnet_cnn" else ["relu1", "relu2"]
    return build_bundle(path, model, cuts, OptimizerSpec(lr=0.01, momentum=0.9)).path


class Device:
    """One session stepping B with fixed bodies (B's output shape decides the grad)."""

    def __init__(self, url: str, bundle: Path) -> None:
        spec = next(s for s in load_bundle(bundle).manifest.segments if s.role == "server")
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((BATCH, *spec.input.sample_shape)).astype(np.float32)
        self.g = np.full((BATCH, *spec.output.sample_shape), 1e-4, dtype=np.float32)
        self.fwd, self.bwd = save({"activation": self.x}), save({"grad": self.g})
        self.http = httpx.Client(base_url=url, timeout=60, headers={"Content-Type": "application/vnd.safetensors"})
        self.sid = self.http.post("/v1/sessions").raise_for_status().json()["session_id"]
        self.step = 0

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.http.post(f"/v1/sessions/{self.sid}/steps/{self.step}/forward", content=self.fwd).raise_for_status()
            self.http.post(f"/v1/sessions/{self.sid}/steps/{self.step}/backward", content=self.bwd).raise_for_status()
            times.append(time.perf_counter() - t0)
            self.step += 1
        return times


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def loop_thread_cpu_s(pid: int) -> float:
    """CPU seconds of the server's main thread (the event loop; B computes on its own thread)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(bundle: Path, state: Path, *extra: str, tree: Path | None = None) -> ServerProcess:
    """``splitexport serve`` from this checkout, or from the one at ``tree`` (``--compare``)."""
    # one token opens every session here: lift the per-token session cap (default 64) for the benchmark
    env = {"SPLITEXPORT_MAX_SESSIONS_PER_TOKEN": "100000", "SPLITEXPORT_MAX_SESSIONS": "100000"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return ServerProcess(bundle, state, None, "--threads", "1", *extra, timeout_s=120, env=env, cwd=tree).start()


def bench_sessions(root: Path, steps: int, sessions: int, blocks: int) -> dict[str, Any]:
    """Two servers at once, one with 1 session and one with ``sessions``; step blocks alternate between
    them, so load swings of the machine hit both alike."""
    bundle = make_bundle(root, "mlp")
    one_server, many_server = serve(bundle, root / "s-one"), serve(bundle, root / "s-many")
    try:
        one, many = Device(one_server.url, bundle), Device(many_server.url, bundle)
        t0 = time.perf_counter()
        for _ in range(sessions - 1):
            many.http.post("/v1/sessions").raise_for_status()
        opened = time.perf_counter() - t0
        one.run(10)
        many.run(10)
        t_one: list[float] = []
        t_many: list[float] = []
        for _ in range(blocks):
            t_one += one.run(steps)
            t_many += many.run(steps)
    finally:
        one_server.stop()
        many_server.stop()
    a, b = statistics.median(t_one), statistics.median(t_many)
    return {"model": "mlp", "sessions": sessions, "step_ms_1_session": a * 1e3, "step_ms_many": b * 1e3,
            "ratio": b / a, "open_ms_per_session": opened / max(sessions - 1, 1) * 1e3}


def b_compute_s(bundle: Path, x: np.ndarray, g: np.ndarray, steps: int, gap_s: float = 0.0) -> float:
    """B's forward + aux-loss step in this process (one thread): CPU seconds per step (median).

    ``gap_s``: idle time after the forward and after the step, as B's thread has in the server between a device's
    calls (the caches and the core cool down: the same compute costs more CPU than back to back)."""
    b = load_bundle(bundle)
    spec = next(s for s in b.manifest.segments if s.role == "server")
    seg = TorchSegment(b.torch_segment(spec.name), b.manifest.optimizer, loss=b.manifest.loss.kind)
    xt, gt = torch.from_numpy(x), torch.from_numpy(g)
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        seg.forward(xt)
        if gap_s:
            t1 = time.process_time()
            time.sleep(gap_s)
            t0 += time.process_time() - t1
        seg.train_with_gradient(gt)
        times.append(time.process_time() - t0)
        if gap_s:
            time.sleep(gap_s)
    return statistics.median(times)


def bench_bytes(root: Path, steps: int) -> list[dict[str, Any]]:
    bundle = make_bundle(root, "mlp10m")
    loaded = load_bundle(bundle)
    spec = loaded.manifest.server_segments[0]
    params = sum(p.numel() for p in loaded.torch_segment(spec.name).parameters())
    rows: list[dict[str, Any]] = []
    for label, extra in (("log + snapshot every 100 (default)", []), ("snapshot every step", ["--checkpoint-every", "1"])):
        server = serve(bundle, root / f"s-bytes-{len(rows)}", *extra)
        try:
            device = Device(server.url, bundle)
            device.run(3)
            before = write_bytes(server.pid)
            times = device.run(steps)
            written = write_bytes(server.pid) - before
        finally:
            server.stop()
        rows.append({"durability": label, "bytes_per_step": written / steps, "step_ms": statistics.median(times) * 1e3})
    rng = np.random.default_rng(0)
    device_x = rng.standard_normal((BATCH, *spec.input.sample_shape)).astype(np.float32)
    device_g = np.full((BATCH, *spec.output.sample_shape), 1e-4, dtype=np.float32)
    rows.append({"durability": "none (B's step in process, nothing written; CPU time)", "bytes_per_step": 0.0,
                 "step_ms": b_compute_s(bundle, device_x, device_g, max(steps // 2, 3)) * 1e3})
    step_tensors = device_x.nbytes * 2 + device_g.nbytes  # logged activation + grad, stored reply
    for r in rows:
        r["b_params"] = params
        r["step_tensor_bytes"] = step_tensors
    return rows


def bench_strategy_bytes(root: Path, model: str, iterations: int, clients: int = 8) -> list[dict[str, Any]]:
    """PSL iterations of ``clients`` devices (one thread each, so the barrier fills); bytes written per iteration."""
    from concurrent.futures import ThreadPoolExecutor

    bundle = make_bundle(root, model)
    loaded = load_bundle(bundle)
    params = sum(p.numel() for p in loaded.torch_segment(loaded.manifest.server_segments[0].name).parameters())
    rows: list[dict[str, Any]] = []
    for label, extra in (("step log (default)", []), ("snapshot every iteration", ["--checkpoint-every", "1"])):
        server = serve(bundle, root / f"s-strategy-{len(rows)}", "--strategy", "psl", "--clients", str(clients),
                       *extra)
        try:
            devices = [Device(server.url, bundle) for _ in range(clients)]
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda d: d.run(2), devices))
                before = write_bytes(server.pid)
                t0 = time.perf_counter()
                list(pool.map(lambda d: d.run(iterations), devices))
                elapsed = time.perf_counter() - t0
                written = write_bytes(server.pid) - before
        finally:
            server.stop()
        x, g = devices[0].x, devices[0].g
        rows.append({"durability": label, "b_params": params, "clients": clients,
                     "bytes_per_iteration": written / iterations, "iteration_ms": elapsed / iterations * 1e3,
                     "step_tensor_bytes": clients * (x.nbytes * 2 + g.nbytes)})
    return rows


def bench_cpu(root: Path, model: str, steps: int, blocks: int, compare: Path | None = None,
              serve_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Server CPU per step and B's in-process CPU per step, in alternating blocks; with ``compare``, a second
    server run from that checkout (e.g. ``git worktree add /tmp/before <commit>``) takes its blocks in turn.
    ``serve_args`` go to this checkout's server only (the compared one may not know them)."""
    bundle = make_bundle(root, model)
    trees: dict[str, Path | None] = {"this": None, **({"compared": compare} if compare is not None else {})}
    servers = {k: serve(bundle, root / f"s-cpu-{model}-{k}", "--checkpoint-every", "1000000",
                        *(serve_args if t is None else ()), tree=t)
               for k, t in trees.items()}
    try:
        devices = {k: Device(s.url, bundle) for k, s in servers.items()}
        for d in devices.values():
            d.run(10)
        cpu: dict[str, list[float]] = {k: [] for k in servers}
        loop: list[float] = []
        b, b_gapped, wall = [], [], []
        for _ in range(blocks):
            for k, server in servers.items():
                c0, l0 = server.cpu_s(), loop_thread_cpu_s(server.pid)
                times = devices[k].run(steps)
                cpu[k].append((server.cpu_s() - c0) / steps)
                if k == "this":
                    loop.append((loop_thread_cpu_s(server.pid) - l0) / steps)
                    wall.append(statistics.median(times))
            b.append(b_compute_s(bundle, devices["this"].x, devices["this"].g, steps))
            b_gapped.append(b_compute_s(bundle, devices["this"].x, devices["this"].g, steps, gap_s=wall[-1] / 2))
    finally:
        for server in servers.values():
            server.stop()
    server_cpu, b_cpu, b_gap = statistics.median(cpu["this"]), statistics.median(b), statistics.median(b_gapped)
    out = {"model": model, "serve_args": list(serve_args), "server_cpu_ms_per_step": server_cpu * 1e3, "b_ms_per_step": b_cpu * 1e3,
           "overhead_ms_per_step": (server_cpu - b_cpu) * 1e3, "loop_thread_ms_per_step": statistics.median(loop) * 1e3,
           "step_wall_ms": statistics.median(wall) * 1e3, "b_gapped_ms_per_step": b_gap * 1e3,
           "overhead_vs_gapped_ms_per_step": (server_cpu - b_gap) * 1e3}
    if compare is not None:
        other = statistics.median(cpu["compared"])
        out.update(compared_tree=str(compare), compared_server_cpu_ms_per_step=other * 1e3,
                   compared_overhead_ms_per_step=(other - b_cpu) * 1e3)
    return out


def bench_check(root: Path, steps: int) -> list[dict[str, Any]]:
    """The server's refusal of non-finite updates (``TorchSegment.try_staged``): B's step in process with and
    without it, alternating step by step (thread CPU time, median), for SGD with momentum and Adam."""
    rows = []
    for model in ("mlp", "resnet_cnn"):
        b = load_bundle(make_bundle(root, model))
        spec = b.manifest.server_segments[0]
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((BATCH, *spec.input.sample_shape))
                             .astype(np.float32))
        g = torch.full((BATCH, *spec.output.sample_shape), 1e-4)
        for opt in (OptimizerSpec(name="sgd", lr=0.01, momentum=0.9), OptimizerSpec(name="adam", lr=1e-3)):
            seg = TorchSegment(b.torch_segment(spec.name), opt, restorable=True)
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(2 * steps + 10):
                checked = bool(i % 2)
                t0 = time.thread_time()
                seg.forward(x)
                seg.stage_gradient(g)
                if checked:
                    seg.try_staged()
                seg.apply_staged()
                if i >= 10:
                    times[checked].append(time.thread_time() - t0)
            plain, with_check = statistics.median(times[False]), statistics.median(times[True])
            rows.append({"model": model, "optimizer": opt.name, "step_ms": plain * 1e3,
                         "step_with_check_ms": with_check * 1e3, "check_ms": (with_check - plain) * 1e3})
    return rows


def bench_store(root: Path, steps: int) -> list[dict[str, Any]]:
    """One step's commit to the server's store (session row, response, logged inputs; the MLP's batch-32 sizes),
    CPU and wall time, with the server's ``synchronous=FULL`` (an fsync per commit) and, for reference,
    ``NORMAL`` (fsync at WAL checkpoints only: safe against a killed process, not against power loss)."""
    from server._store import SessionWrite, StepRecord, Store

    rng = np.random.default_rng(0)
    inputs = save({"activation": rng.standard_normal((BATCH, 64)).astype(np.float32),
                   "grad": rng.standard_normal((BATCH, 64)).astype(np.float32)})
    response = save({"grad": rng.standard_normal((BATCH, 64)).astype(np.float32)})
    rows = []
    for sync in ("FULL", "NORMAL"):
        store = Store(root / f"store-{sync}", "full" if sync == "FULL" else "normal")
        store.write_sessions([SessionWrite.open("s", "t")])
        cpu, wall = [], []
        for n in range(steps + 5):
            c0, t0 = time.process_time(), time.perf_counter()
            store.commit_steps([StepRecord("s", "backward", n, n + 1, "0" * 64, response, inputs)])
            if n >= 5:
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - t0)
        store.close()
        rows.append({"synchronous": sync, "cpu_ms": sum(cpu) / len(cpu) * 1e3, "wall_ms": statistics.median(wall) * 1e3})
    return rows


async def _devices(url: str, bundle: Path, n: int, seconds: float, opened: Any) -> int:
    """``n`` devices stepping B as fast as the server lets them for ``seconds`` once all have opened their
    sessions (then ``opened`` is set); the steps they made."""
    spec = next(s for s in load_bundle(bundle).manifest.segments if s.role == "server")
    x = np.random.default_rng(0).standard_normal((BATCH, *spec.input.sample_shape)).astype(np.float32)
    fwd, bwd = save({"activation": x}), save({"grad": np.full((BATCH, *spec.output.sample_shape), 1e-4, np.float32)})
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4, keepalive_expiry=2)
    headers = {"Content-Type": "application/vnd.safetensors"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120, headers=headers) as http:
        async def post(path: str, body: bytes | None = None) -> httpx.Response:
            while True:  # 503 busy and a pooled connection closed meanwhile: retry (exactly once makes it safe)
                try:
                    r = await http.post(path, content=body)
                except httpx.TransportError:
                    continue
                if r.status_code != 503:
                    return r.raise_for_status()

        sids = [(await post("/v1/sessions")).json()["session_id"] for _ in range(n)]
        opened.set()
        deadline = time.monotonic() + seconds

        async def device(sid: str) -> int:
            step = 0
            while time.monotonic() < deadline:
                await post(f"/v1/sessions/{sid}/steps/{step}/forward", fwd)
                await post(f"/v1/sessions/{sid}/steps/{step}/backward", bwd)
                step += 1
            return step

        return sum(await asyncio.gather(*(device(sid) for sid in sids)))


def _contend(url: str, bundle: Path, n: int, seconds: float, opened: Any, steps: Any) -> None:
    steps.value = asyncio.run(_devices(url, bundle, n, seconds, opened))


def bench_healthz(root: Path, devices: int, seconds: float) -> dict[str, Any]:
    """``/healthz`` latency while ``devices`` contend for B: the devices run in a child process, the probe
    (one GET every 10 ms, its own connection) here, the server in a third process."""
    bundle = make_bundle(root, "mlp")
    server = serve(bundle, root / "s-healthz")
    try:
        ctx = multiprocessing.get_context("spawn")
        steps, opened = ctx.Value("q", 0), ctx.Event()
        child = ctx.Process(target=_contend, args=(server.url, bundle, devices, seconds, opened, steps))
        child.start()
        latencies: list[float] = []
        with httpx.Client(base_url=server.url, timeout=30) as probe:
            while not opened.wait(0.1) and child.is_alive():
                pass
            while child.is_alive():
                t0 = time.perf_counter()
                probe.get("/healthz").raise_for_status()
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the devices' process failed (exit code {child.exitcode})")
    finally:
        server.stop()
    lat = np.array(latencies) * 1e3
    return {"devices": devices, "seconds": seconds, "steps": int(steps.value), "probes": len(latencies),
            "healthz_p50_ms": float(np.percentile(lat, 50)), "healthz_p99_ms": float(np.percentile(lat, 99)),
            "healthz_max_ms": float(lat.max())}


async def _open_close_lag(state: Any, n: int, callers: int) -> dict[str, float]:
    """Open ``n`` sessions from ``callers`` concurrent coroutines, then close them likewise, while a ticker on the
    loop measures how late it wakes (a 1 ms sleep); per phase: the loop's total lateness and longest stall (the
    ticker's lateness when idle, for reference)."""
    from server._session import Session

    lateness: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lateness.append(max(time.perf_counter() - t0 - 0.001, 0.0))

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)  # a checkout before the session writer: synchronous, the commit on the loop
        return await result if inspect.isawaitable(result) else result

    sessions: list[Session] = []

    async def opener(k: int) -> None:
        for _ in range(k):
            sessions.append(await call(state.open_session, "t" * 64))
            await asyncio.sleep(0)  # one request each: the loop may run others between them

    async def closer(mine: list[Session]) -> None:
        for s in mine:
            await call(state.close_session, s)
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    lateness.clear()
    await asyncio.sleep(0.5)  # the ticker's own lateness on this machine, nothing else running
    out: dict[str, float] = {"idle_late_ms_per_s": sum(lateness) / 0.5 * 1e3,
                             "idle_longest_stall_ms": max(lateness, default=0.0) * 1e3}
    for phase in ("open", "close"):
        lateness.clear()
        commits, t0, cpu0 = state.store.commits, time.perf_counter(), time.thread_time()
        if phase == "open":
            await asyncio.gather(*(opener(n // callers) for _ in range(callers)))
        else:
            await asyncio.gather(*(closer(sessions[i::callers]) for i in range(callers)))
        wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        await asyncio.sleep(0.01)  # the ticker records a stall when it wakes: let it wake before reading
        calls = n // callers * callers
        out.update({f"loop_held_ms_per_{phase}": sum(lateness) / calls * 1e3,
                    f"longest_stall_ms_{phase}": max(lateness, default=0.0) * 1e3,
                    f"wall_ms_per_{phase}": wall / calls * 1e3,
                    f"loop_cpu_ms_per_{phase}": cpu / calls * 1e3,
                    f"commits_per_{phase}": (state.store.commits - commits) / calls})
    running = False
    await tick
    return out


def bench_sessions_open(root: Path, n: int, callers: int = 8) -> dict[str, Any]:
    """Session opens and closes on the event loop (see :func:`_open_close_lag`), ``synchronous=FULL``."""
    from server import ServerSettings, ServerState

    settings = ServerSettings(bundle=make_bundle(root, "mlp"), state_dir=root / "s-open",
                              max_sessions_per_token=n, max_sessions=n)
    state = ServerState(settings)

    async def run() -> dict[str, float]:
        try:
            return await _open_close_lag(state, n, callers)
        finally:
            await state.aclose()

    return {"sessions": n // callers * callers, "callers": callers, **asyncio.run(run())}


PARTS = ("sessions", "bytes", "cpu", "check", "store", "healthz", "strategy", "sessions-open")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sessions", type=int, default=5000)
    p.add_argument("--sessions-open", type=int, default=400, help="sessions-open: how many sessions to open and close")
    p.add_argument("--devices", type=int, default=60, help="devices contending for B while /healthz is probed")
    p.add_argument("--seconds", type=float, default=20, help="how long they contend")
    p.add_argument("--compare", type=Path, default=None,
                   help="cpu: also run the server of the checkout at this path, blocks alternating (before/after)")
    p.add_argument("--serve-arg", action="append", default=None, metavar="ARG",
                   help="cpu: an extra `splitexport serve` argument for this checkout's server (repeatable; "
                   "e.g. --serve-arg=--sync --serve-arg=normal)")
    p.add_argument("--only", choices=PARTS, action="append", help="run only these parts (repeatable)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    steps, sessions, blocks = (10, 50, 2) if args.smoke else (args.steps, args.sessions, 5)
    devices, seconds = (4, 3.0) if args.smoke else (args.devices, args.seconds)
    parts = set(args.only or PARTS)
    torch.set_num_threads(1)
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    result: dict[str, Any] = {"machine": machine(), "batch": BATCH}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "sessions" in parts:
            result["sessions"] = bench_sessions(root, max(steps // blocks, 5), sessions, blocks)
        if "bytes" in parts:
            result["bytes"] = bench_bytes(root, max(steps // 4, 5))
        if "cpu" in parts:
            result["cpu"] = [bench_cpu(root, m, max(steps // blocks, 5), blocks, args.compare,
                                     tuple(args.serve_arg or ()))
                             for m in ("mlp", "resnet_cnn")]
        if "check" in parts:
            result["check"] = bench_check(root, steps)
        if "store" in parts:
            result["store"] = bench_store(root, steps)
        if "healthz" in parts:
            result["healthz"] = bench_healthz(root, devices, seconds)
        if "strategy" in parts:
            result["strategy"] = bench_strategy_bytes(root, "mlp" if args.smoke else "mlp10m", max(steps // 20, 3))
        if "sessions-open" in parts:
            result["sessions_open"] = bench_sessions_open(root, 16 if args.smoke else args.sessions_open)
    print(f"machine: {result['machine']}")
    if "sessions" in result:
        s = result["sessions"]
        print(f"step time, 1 session: {s['step_ms_1_session']:.2f} ms; with {s['sessions']} sessions: "
              f"{s['step_ms_many']:.2f} ms (x{s['ratio']:.2f}); opening a session {s['open_ms_per_session']:.2f} ms")
    for r in result.get("strategy", []):
        print(f"PSL, {r['clients']} devices, B {r['b_params']} params, {r['durability']}: "
              f"{r['bytes_per_iteration'] / 1e6:.3f} MB written per iteration (the iteration's tensors "
              f"{r['step_tensor_bytes'] / 1e3:.0f} kB), {r['iteration_ms']:.1f} ms per iteration")
    for r in result.get("bytes", []):
        print(f"B {r['b_params']} params, {r['durability']}: {r['bytes_per_step'] / 1e6:.3f} MB written per step "
              f"(step tensors {r['step_tensor_bytes'] / 1e3:.0f} kB), step {r['step_ms']:.1f} ms")
    for r in result.get("cpu", []):
        print(f"{r['model']}: server CPU {r['server_cpu_ms_per_step']:.2f} ms/step (event-loop thread "
              f"{r['loop_thread_ms_per_step']:.2f}), B {r['b_ms_per_step']:.2f} ms, overhead "
              f"{r['overhead_ms_per_step']:.2f} ms/step; B with the server's idle gaps ({r['step_wall_ms'] / 2:.2f} ms "
              f"after each half) {r['b_gapped_ms_per_step']:.2f} ms, overhead {r['overhead_vs_gapped_ms_per_step']:.2f} "
              "ms/step")
        if "compared_tree" in r:
            print(f"  {r['compared_tree']}: server CPU {r['compared_server_cpu_ms_per_step']:.2f} ms/step, overhead "
                  f"{r['compared_overhead_ms_per_step']:.2f} ms/step (same blocks, same B)")
    for r in result.get("check", []):
        print(f"{r['model']} {r['optimizer']}: B's step {r['step_ms']:.3f} ms, with the non-finite check "
              f"{r['step_with_check_ms']:.3f} ms (+{r['check_ms']:.3f})")
    for r in result.get("store", []):
        print(f"store commit of one step, synchronous={r['synchronous']}: CPU {r['cpu_ms']:.3f} ms, "
              f"wall {r['wall_ms']:.3f} ms (median)")
    if "healthz" in result:
        h = result["healthz"]
        print(f"/healthz while {h['devices']} devices contend for B ({h['steps']} steps in {h['seconds']:g} s): "
              f"p50 {h['healthz_p50_ms']:.1f} ms, p99 {h['healthz_p99_ms']:.1f} ms, max {h['healthz_max_ms']:.1f} ms "
              f"over {h['probes']} probes")
    if "sessions_open" in result:
        o = result["sessions_open"]
        print(f"event-loop ticker (1 ms) idle: {o['idle_late_ms_per_s']:.1f} ms late per second, longest stall "
              f"{o['idle_longest_stall_ms']:.1f} ms")
        for phase in ("open", "close"):
            print(f"{o['sessions']} session {phase}s by {o['callers']} concurrent callers: event loop held "
                  f"{o[f'loop_held_ms_per_{phase}']:.3f} ms per {phase} (longest stall "
                  f"{o[f'longest_stall_ms_{phase}']:.1f} ms; its thread's CPU {o[f'loop_cpu_ms_per_{phase}']:.3f} ms), "
                  f"{o[f'wall_ms_per_{phase}']:.2f} ms wall and "
                  f"{o[f'commits_per_{phase}']:.2f} commits per {phase}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
