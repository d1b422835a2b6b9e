"""Real servers on loopback: uvicorn in a thread (state inspectable) or in a subprocess (killable)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from server import ServerSettings, ServerState, create_app
from splitexport import OptimizerSpec, SourceSpec, partition, write_bundle
from splitexport.models import mlp, resnet_cnn

TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_bundle(path: Path, model: str, cuts: list[str], opt: OptimizerSpec) -> Path:
    torch.manual_seed(0)
    m = {"resnet": resnet_cnn, "mlp": mlp}[model]()
    part = partition(m, cuts, torch.zeros(2, 1, 8, 8))
    write_bundle(part, path, source=SourceSpec(file_name=f"{model}.pt", sha256="0" * 64, kind="state_dict"),
                 optimizer=opt)
    return path


@pytest.fixture(scope="session")
def resnet_bundle(tmp_path_factory) -> Path:
    opt = OptimizerSpec(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    return make_bundle(tmp_path_factory.mktemp("b") / "resnet", "resnet", ["layer1", "layer3"], opt)


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "mlp", "mlp", ["relu1", "relu2"], OptimizerSpec(lr=0.1, momentum=0.9))


@pytest.fixture(scope="session")
def mlp_single_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "mlp1", "mlp", ["relu1"], OptimizerSpec(lr=0.1, momentum=0.9))


@contextmanager
def threaded_server(bundle: Path, state_dir: Path, **kw: object) -> Iterator[tuple[str, ServerState]]:
    port = free_port()
    settings = ServerSettings(bundle=bundle, state_dir=state_dir, port=port, tokens=TOKEN, **kw)  # type: ignore[arg-type]
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until_healthy(url: str, proc: subprocess.Popen[bytes], *, timeout_s: float = 60.0,
                       died: str = "server died") -> None:
    """Poll ``url``/healthz until the child ``proc`` answers 200; RuntimeError if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(died) from None
            time.sleep(0.05)
    raise RuntimeError("server process did not start")


class ServerProcess:
    """`splitexport serve` as a child process, so a test can SIGKILL it."""

    def __init__(self, bundle: Path, state_dir: Path, tokens: Path) -> None:
        self.args = [sys.executable, "-m", "splitexport", "serve", str(bundle), "--port", str(free_port()),
                     "--state-dir", str(state_dir), "--tokens", str(tokens)]
        self.url = f"http://127.0.0.1:{self.args[6]}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_until_healthy(self.url, self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown hook runs
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
