"""What the server's state costs: sessions, durability bytes, per-call CPU (issue 12).

    python benchmarks/bench_server_state.py [--smoke] [--steps 200] [--sessions 5000] [--json out.json]
                                            [--only sessions,bytes,cpu,strategy]

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
  interleaved in blocks with the HTTP steps (same B, same thread count), for mlp and resnet_cnn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.numpy import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import ServerProcess, machine

from splitexport import OptimizerSpec, SourceSpec, TorchSegment, load_bundle, partition, write_bundle
from splitexport.models import MLP, resnet_cnn

BATCH = 32


def make_bundle(root: Path, name: str) -> Path:
    path = root / name
    if path.exists():
        return path
    torch.manual_seed(0)
    model: torch.nn.Module = resnet_cnn() if name == "resnet_cnn" else MLP(hidden=3162 if name == "mlp10m" else 64)
    cuts = ["layer1", "layer3"] if name == "resnet_cnn" else ["relu1", "relu2"]
    part = partition(model, cuts, torch.zeros(2, 1, 8, 8))
    write_bundle(part, path, source=SourceSpec(file_name=f"{name}.pt", sha256="0" * 64, kind="state_dict"),
                 optimizer=OptimizerSpec(lr=0.01, momentum=0.9))
    return path


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


def serve(bundle: Path, state: Path, *extra: str) -> ServerProcess:
    # one token opens every session here: lift the per-token session cap (default 64) for the benchmark
    return ServerProcess(bundle, ["--state-dir", str(state), "--threads", "1", *extra],
                         env={"SPLITEXPORT_MAX_SESSIONS_PER_TOKEN": "100000", "SPLITEXPORT_MAX_SESSIONS": "100000"})


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


def b_compute_s(bundle: Path, x: np.ndarray, g: np.ndarray, steps: int) -> float:
    """B's forward + aux-loss step in this process (one thread): CPU seconds per step (median)."""
    b = load_bundle(bundle)
    spec = next(s for s in b.manifest.segments if s.role == "server")
    seg = TorchSegment(b.torch_segment(spec.name), b.manifest.optimizer, loss=b.manifest.loss.kind)
    xt, gt = torch.from_numpy(x), torch.from_numpy(g)
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        seg.forward(xt)
        seg.train_with_gradient(gt)
        times.append(time.process_time() - t0)
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
            before = write_bytes(server.proc.pid)
            times = device.run(steps)
            written = write_bytes(server.proc.pid) - before
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
                before = write_bytes(server.proc.pid)
                t0 = time.perf_counter()
                list(pool.map(lambda d: d.run(iterations), devices))
                elapsed = time.perf_counter() - t0
                written = write_bytes(server.proc.pid) - before
        finally:
            server.stop()
        x, g = devices[0].x, devices[0].g
        rows.append({"durability": label, "b_params": params, "clients": clients,
                     "bytes_per_iteration": written / iterations, "iteration_ms": elapsed / iterations * 1e3,
                     "step_tensor_bytes": clients * (x.nbytes * 2 + g.nbytes)})
    return rows


def bench_cpu(root: Path, model: str, steps: int, blocks: int) -> dict[str, Any]:
    bundle = make_bundle(root, model)
    server = serve(bundle, root / f"s-cpu-{model}", "--checkpoint-every", "1000000")
    try:
        device = Device(server.url, bundle)
        device.run(10)
        cpu, b = [], []
        for _ in range(blocks):
            c0 = server.cpu_s()
            device.run(steps)
            cpu.append((server.cpu_s() - c0) / steps)
            b.append(b_compute_s(bundle, device.x, device.g, steps))
    finally:
        server.stop()
    server_cpu, b_cpu = statistics.median(cpu), statistics.median(b)
    return {"model": model, "server_cpu_ms_per_step": server_cpu * 1e3, "b_ms_per_step": b_cpu * 1e3,
            "overhead_ms_per_step": (server_cpu - b_cpu) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sessions", type=int, default=5000)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--only", default="sessions,bytes,cpu,strategy", help="comma-separated sections to run")
    args = p.parse_args()
    only = set(args.only.split(","))
    steps, sessions, blocks = (10, 50, 2) if args.smoke else (args.steps, args.sessions, 5)
    torch.set_num_threads(1)
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result: dict[str, Any] = {"machine": machine(), "batch": BATCH}
        if "sessions" in only:
            result["sessions"] = bench_sessions(root, max(steps // blocks, 5), sessions, blocks)
        if "bytes" in only:
            result["bytes"] = bench_bytes(root, max(steps // 4, 5))
        if "cpu" in only:
            result["cpu"] = [bench_cpu(root, m, max(steps // blocks, 5), blocks) for m in ("mlp", "resnet_cnn")]
        if "strategy" in only:
            result["strategy"] = bench_strategy_bytes(root, "mlp" if args.smoke else "mlp10m", max(steps // 20, 3))
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
        print(f"{r['model']}: server CPU {r['server_cpu_ms_per_step']:.2f} ms/step, B {r['b_ms_per_step']:.2f} ms, "
              f"overhead {r['overhead_ms_per_step']:.2f} ms/step")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
