"""Real servers on loopback: uvicorn in a thread (state inspectable) or ``splitexport serve`` in a child
process (killable, restartable, optionally with a fault injected through ``SPLITEXPORT_FAULT``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from server import ServerSettings, ServerState, create_app
from splitexport._demo import free_port

TOKEN = "test-token-0123456789"

__all__ = ["TOKEN", "ServerProcess", "free_port", "threaded_server", "wait_until_healthy"]


@contextmanager
def threaded_server(bundle: Path, state_dir: Path, prepare: Callable[[FastAPI], None] | None = None,
                    **kw: object) -> Iterator[tuple[str, ServerState]]:
    """The app on uvicorn in a daemon thread, accepting :data:`TOKEN`; ``kw`` are :class:`ServerSettings`;
    ``prepare`` may change the app before it serves (e.g. its middleware stack)."""
    port = free_port()
    settings = ServerSettings(bundle=bundle, state_dir=state_dir, port=port, tokens=TOKEN, **kw)  # type: ignore[arg-type]
    app = create_app(settings)
    if prepare is not None:
        prepare(app)
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
    """``splitexport serve BUNDLE --port P [--state-dir D] [--tokens T] *extra`` as a child process.

    ``start()`` (again after a kill: a restart on the same port and state), ``kill()`` (SIGKILL: no shutdown
    hook runs), ``stop()`` (SIGTERM: a clean shutdown writes a snapshot). With ``stderr_dir`` each start's
    stderr goes to ``stderr-<n>.txt`` there (a file, not a pipe: a full pipe would block the server);
    otherwise the child inherits this process's stderr.
    """

    def __init__(self, bundle: Path, state_dir: Path | None = None, tokens: Path | None = None, *extra: str,
                 env: dict[str, str] | None = None, stderr_dir: Path | None = None, timeout_s: float = 60.0,
                 cwd: Path | None = None) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "splitexport", "serve", str(bundle), "--port", str(self.port),
                     *(["--state-dir", str(state_dir)] if state_dir is not None else []),
                     *(["--tokens", str(tokens)] if tokens is not None else []), *extra]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.stderr_dir = stderr_dir
        self.timeout_s = timeout_s
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log: list[str] = []
        """stderr of the processes that ended (with ``stderr_dir``)."""
        self._stderr: Path | None = None

    def start(self, fault: str | None = None) -> ServerProcess:
        """Start the child and wait until it is healthy; ``fault`` sets ``SPLITEXPORT_FAULT`` for this start."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("SPLITEXPORT_FAULT", None)
        if fault is not None:
            env["SPLITEXPORT_FAULT"] = fault
        if self.proc is not None and self.proc.poll() is not None and self._stderr is not None:
            self.log.append(self._stderr.read_text())
        if self.stderr_dir is None:
            self.proc = proc = subprocess.Popen(self.args, env=env, cwd=self.cwd)
        else:
            self._stderr = self.stderr_dir / f"stderr-{self.starts}.txt"
            with self._stderr.open("wb") as err:
                self.proc = proc = subprocess.Popen(self.args, env=env, stderr=err, cwd=self.cwd)
        self.starts += 1
        try:
            wait_until_healthy(self.url, proc, timeout_s=self.timeout_s)
        except RuntimeError as exc:
            if proc.poll() is None:
                self.kill()
                raise
            raise RuntimeError(self.stderr() or "server died") from exc
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> str:
        """SIGTERM and wait; the last start's stderr (with ``stderr_dir``; else "")."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=60)
        return self.stderr()

    def stderr(self) -> str:
        return self._stderr.read_text() if self._stderr is not None else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds of the running child so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
