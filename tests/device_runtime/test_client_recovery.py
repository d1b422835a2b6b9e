"""The Python client on its own: it recovers a forward lost to a server restart, honours Retry-After, and
``python -m device_runtime train`` takes its token from ``SPLITEXPORT_TOKEN``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from device_runtime import RemoteSegment, ServerClient, ServerError
from splitexport import (
    OptimizerSpec,
    SplitModel,
    TorchSegment,
    load_bundle,
    max_abs_difference,
    torch_split_model,
)
from splitexport.protocol import ErrorCode
from splitexport.simulation.data import batch_indices
from tests._support import TOKEN, ServerProcess, make_bundle, threaded_server


class RestartBeforeC:
    """Segment C of the device, with the server SIGKILLed and restarted before its ``at``-th step: that is,
    after B's forward of the step and before its backward, so the server loses the forward."""

    def __init__(self, inner: TorchSegment, server: ServerProcess, at: int) -> None:
        self.inner, self.server, self.at, self.calls = inner, server, at, 0

    def train_with_labels(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        if self.calls == self.at:
            self.server.kill()
            self.server.start()
        self.calls += 1
        return self.inner.train_with_labels(x, y)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_client_recovers_a_forward_lost_to_a_server_restart(tmp_path: Path, digits) -> None:
    """A BatchNorm model; the server is killed between a step's forward and backward and restarted. The
    client's backward finds the forward gone and re-sends it by itself: every weight (B's BatchNorm
    statistics included) ends as in an uninterrupted in-process run."""
    path = make_bundle(tmp_path / "bundle", "resnet", ["layer1", "layer3"],
                       OptimizerSpec(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4))
    bundle = load_bundle(path)
    m = bundle.manifest
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    server = ServerProcess(path, tmp_path / "state", tokens)
    server.start()
    steps, kill_at = 6, 3
    batches = list(batch_indices(len(digits.x_train), 16, seed=0, epoch=0))[:steps]
    try:
        client = ServerClient(server.url, TOKEN, max_wait_s=60)
        remote = RemoteSegment(client)
        a = TorchSegment(bundle.torch_segment("A"), m.optimizer, loss=m.loss.kind, input_grad=False)
        c = TorchSegment(bundle.torch_segment("C"), m.optimizer, loss=m.loss.kind, input_grad=True)
        model = SplitModel([a, remote, RestartBeforeC(c, server, kill_at)])  # type: ignore[list-item]
        for idx in batches:
            model.step(digits.x_train[idx], digits.y_train[idx])
        assert remote.lost_forwards == 1  # the recovery really ran, once
        assert client.session(remote.session_id)["next_step"] == steps
        server.stop()  # a clean shutdown writes the final checkpoint
    finally:
        server.stop()
    saved = torch.load(tmp_path / "state" / "checkpoint.pt", weights_only=True)
    assert saved["applied_steps"] == steps
    reference = torch_split_model([bundle.torch_segment(s.name) for s in m.segments], m.optimizer)
    for idx in batches:
        reference.step(digits.x_train[idx], digits.y_train[idx])
    got = {**{f"A.{k}": v for k, v in a.module.state_dict().items()},
           **{f"B.{k}": v for k, v in saved["module"].items()},
           **{f"C.{k}": v for k, v in c.module.state_dict().items()}}
    ref: dict[str, torch.Tensor] = {}
    for n, r in zip("ABC", reference.runners, strict=True):
        assert isinstance(r, TorchSegment)
        ref.update({f"{n}.{k}": v for k, v in r.module.state_dict().items()})
    assert got.keys() == ref.keys() and any("running_var" in k for k in got if k.startswith("B."))
    diff, where = max_abs_difference(got, ref)
    print(f"server restart between forward and backward, client recovered: max |dw| vs in-process = {diff:.3e} "
          f"({where})")
    assert diff <= 1e-6, where


class _Flaky(BaseHTTPRequestHandler):
    """503 busy with ``Retry-After: 1`` for the first call, then 200."""

    times: ClassVar[list[float]] = []

    def do_GET(self) -> None:
        self.times.append(time.monotonic())
        first = len(self.times) == 1
        body = json.dumps({"error": {"code": "busy", "message": "retry"}} if first else
                          {"session_id": "s", "next_step": 0, "expected": "forward"}).encode()
        self.send_response(503 if first else 200)
        if first:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_client_honours_retry_after() -> None:
    _Flaky.times = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = ServerClient(f"http://127.0.0.1:{httpd.server_address[1]}", backoff_s=0.01)
        assert client.session("s")["next_step"] == 0
        assert client.retries == 1
        gap = _Flaky.times[1] - _Flaky.times[0]
        assert gap >= 1.0, f"retried after {gap:.3f} s, before the server's Retry-After of 1 s"
        with pytest.raises(ServerError) as err:  # a Retry-After beyond max_wait_s: give up at once
            _Flaky.times = []
            ServerClient(f"http://127.0.0.1:{httpd.server_address[1]}", max_wait_s=0.5).session("s")
        assert err.value.code == ErrorCode.UNREACHABLE and len(_Flaky.times) == 1
    finally:
        httpd.shutdown()


def test_device_cli_reads_the_token_from_the_environment(mlp_bundle_for_cli: Path, tmp_path: Path) -> None:
    """``python -m device_runtime train`` as a user runs it (a subprocess: the CLI's own stderr, not a capture)."""
    args = [sys.executable, "-m", "device_runtime", "train", "--bundle", str(mlp_bundle_for_cli), "--runtime", "torch",
            "--epochs", "1", "--no-progress", "--out", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "SPLITEXPORT_TOKEN"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])

    def run(*extra: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*args, *extra], env=env if token is None else {**env, "SPLITEXPORT_TOKEN": token},
                              capture_output=True, text=True, timeout=300, check=False)

    with threaded_server(mlp_bundle_for_cli, tmp_path / "state") as (url, state):
        missing = run("--server", url)
        err = missing.stderr.strip()
        assert missing.returncode == 2 and err.count("\n") == 0 and ErrorCode.MISSING_TOKEN in err, err
        assert run("--server", url, token=TOKEN).returncode == 0
        assert state.applied_steps > 0
        # --token wins over the environment
        assert run("--server", url, "--token", TOKEN, token="not-the-token-0123456789").returncode == 0


@pytest.fixture
def mlp_bundle_for_cli(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "mlp", "mlp", ["relu1", "relu2"], OptimizerSpec(lr=0.1, momentum=0.9))
