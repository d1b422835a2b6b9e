"""Many devices at once: waiting costs no thread, nobody starves, /healthz answers, shutdown is quick."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load, save

from splitexport import load_bundle
from tests._support import TOKEN, ServerProcess, free_port, threaded_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ST = {**AUTH, "Content-Type": "application/vnd.safetensors"}


def _bodies(bundle: Path, batch: int = 4) -> tuple[bytes, bytes]:
    spec = next(s for s in load_bundle(bundle).manifest.segments if s.role == "server")
    x = np.random.default_rng(0).standard_normal((batch, *spec.input.sample_shape)).astype(np.float32)
    g = np.full((batch, *spec.output.sample_shape), 1e-3, dtype=np.float32)
    return save({"activation": x}), save({"grad": g})


async def _post(http: httpx.AsyncClient, path: str, body: bytes | None = None) -> httpx.Response:
    """POST, retrying 503 and a pooled connection the server closed meanwhile (exactly once makes it safe)."""
    while True:
        try:
            r = await http.post(path, content=body, headers=ST if body is not None else AUTH)
        except httpx.TransportError:
            continue
        if r.status_code != 503:
            return r.raise_for_status()


async def _device(http: httpx.AsyncClient, fwd: bytes, bwd: bytes, steps: int) -> int:
    sid = (await _post(http, "/v1/sessions")).json()["session_id"]
    for n in range(steps):
        for call, body in (("forward", fwd), ("backward", bwd)):
            await _post(http, f"/v1/sessions/{sid}/steps/{n}/{call}", body)
    return steps


async def _health_probe(http: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float]) -> None:
    """GET /healthz every 20 ms; a latency counts from the first try. A pooled connection can go stale here: when
    this process's loop is busy with 256 devices, a probe may be sent only after uvicorn closed the connection
    at its 5 s keep-alive (the server's loop meanwhile is not held); the retry's time is counted."""
    while not stop.is_set():
        t0 = time.perf_counter()
        while True:
            try:
                r = await http.get("/healthz")
                break
            except httpx.TransportError:
                continue
        r.raise_for_status()
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(0.02)


def test_256_devices_without_a_strategy_all_make_progress(mlp_bundle: Path, tmp_path: Path) -> None:
    devices, steps = 256, 2
    fwd, bwd = _bodies(mlp_bundle)
    with threaded_server(mlp_bundle, tmp_path / "s", lease_timeout_s=60, max_sessions_per_token=devices) as (url, state):
        async def run() -> tuple[list[int], list[float]]:
            limits = httpx.Limits(max_connections=devices + 8, max_keepalive_connections=devices + 8,
                                  keepalive_expiry=2)  # below uvicorn's 5 s keep-alive
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http, \
                    httpx.AsyncClient(base_url=url, timeout=10) as probe:
                stop, latencies = asyncio.Event(), list[float]()
                prober = asyncio.create_task(_health_probe(probe, stop, latencies))
                done = await asyncio.wait_for(asyncio.gather(*(_device(http, fwd, bwd, steps)
                                                               for _ in range(devices))), timeout=120)
                stop.set()
                await prober
                return done, latencies

        t0 = time.perf_counter()
        done, latencies = asyncio.run(run())
        elapsed = time.perf_counter() - t0
        threads = state.metrics()
    assert done == [steps] * devices
    assert state.applied_steps == devices * steps
    p99 = float(np.percentile(latencies, 99))
    print(f"{devices} devices x {steps} steps in {elapsed:.1f} s; /healthz p99 {p99 * 1e3:.1f} ms over "
          f"{len(latencies)} probes; {threads['sessions_active']} sessions")
    assert p99 < 0.5  # the event loop is never held by a waiting device


def test_serve_shuts_down_within_seconds_while_devices_wait(mlp_bundle: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "splitexport", "serve", str(mlp_bundle), "--port", str(port),
                             "--state-dir", str(tmp_path / "s"), "--tokens", str(tokens)],
                            stderr=(tmp_path / "stderr.txt").open("wb"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        fwd, _ = _bodies(mlp_bundle)

        async def wait_then_stop() -> float:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                holder = (await http.post("/v1/sessions", headers=AUTH)).json()["session_id"]
                (await http.post(f"/v1/sessions/{holder}/steps/0/forward", content=fwd, headers=ST)).raise_for_status()
                sids = [(await http.post("/v1/sessions", headers=AUTH)).json()["session_id"] for _ in range(20)]
                waiting = [asyncio.create_task(http.post(f"/v1/sessions/{s}/steps/0/forward", content=fwd,
                                                         headers=ST)) for s in sids]
                await asyncio.sleep(0.5)  # all 20 wait for B's lease (held by a device that never comes back)
                assert not any(t.done() for t in waiting)
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                await asyncio.gather(*waiting, return_exceptions=True)
                await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
                return time.perf_counter() - t0

        seconds = asyncio.run(wait_then_stop())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    print(f"shutdown with 20 devices waiting for B: {seconds:.1f} s")
    assert seconds < 8
    assert (tmp_path / "s" / "checkpoint.pt").is_file()  # the final snapshot was written


def _gauge(text: str, name: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(f"splitexport_{name} "))


def test_256_devices_wait_at_a_psl_barrier_on_few_threads(mlp_bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """256 devices in one PSL iteration: 255 wait at the forward barrier while the server process (a real
    ``splitexport serve``, its threads counted in /proc) runs on at most 16 threads; then every step completes."""
    devices, max_threads = 256, 16
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    settings = {"STRATEGY": "psl", "NUM_CLIENTS": devices, "MAX_SESSIONS_PER_TOKEN": devices,
                "ROUND_TIMEOUT_S": 300, "THREADS": 2}  # THREADS: torch's own pool, 2 whatever the machine's cores
    for name, value in settings.items():
        monkeypatch.setenv(f"SPLITEXPORT_{name}", str(value))
    server = ServerProcess(mlp_bundle, tmp_path / "s", tokens)
    server.start()
    assert server.proc is not None
    task_dir = Path(f"/proc/{server.proc.pid}/task")
    fwd, bwd = _bodies(mlp_bundle)

    async def run() -> tuple[int, int, list[bytes], list[bytes], str]:
        limits = httpx.Limits(max_connections=devices + 8, max_keepalive_connections=devices + 8)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as http:
            sids = [(await _post(http, "/v1/sessions")).json()["session_id"] for _ in range(devices)]
            peak, stop = 0, asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, len(os.listdir(task_dir)))
                    await asyncio.sleep(0.01)

            sampler = asyncio.create_task(sample())
            waiting = [asyncio.create_task(_post(http, f"/v1/sessions/{s}/steps/0/forward", fwd)) for s in sids[:-1]]
            deadline = time.monotonic() + 120
            while _gauge((await http.get("/metrics")).text, "barrier_waiting") < devices - 1:
                assert time.monotonic() < deadline, "the devices did not reach the barrier"
                await asyncio.sleep(0.05)
            at_barrier = len(os.listdir(task_dir))
            assert not any(t.done() for t in waiting)  # they wait for the last device
            last = await _post(http, f"/v1/sessions/{sids[-1]}/steps/0/forward", fwd)
            outs = [(await t).content for t in waiting] + [last.content]
            grads = await asyncio.gather(*(_post(http, f"/v1/sessions/{s}/steps/0/backward", bwd) for s in sids))
            metrics = (await http.get("/metrics")).text
            stop.set()
            await sampler
            return at_barrier, peak, outs, [g.content for g in grads], metrics

    try:
        at_barrier, peak, outs, grads, metrics = asyncio.run(run())
        health = httpx.get(server.url + "/healthz").json()
    finally:
        server.stop()
    print(f"{devices} devices at a PSL barrier: {at_barrier} server threads while {devices - 1} waited, peak {peak}")
    assert at_barrier <= max_threads and peak <= max_threads
    assert health["steps_applied"] == 1  # one B step over the 256 devices' concatenated batch
    assert _gauge(metrics, "iterations_total") == 1 and _gauge(metrics, "barrier_waiting") == 0
    spec = next(s for s in load_bundle(mlp_bundle).manifest.segments if s.role == "server")
    for out, grad in zip(outs, grads, strict=True):
        y, g = load(out)["output"], load(grad)["grad"]
        assert y.shape == (4, *spec.output.sample_shape) and np.isfinite(y).all()
        assert g.shape == (4, *spec.input.sample_shape) and np.isfinite(g).all() and np.abs(g).sum() > 0
