"""``splitexport demo``: the product path on the built-in default, each step printed as the command to type.

partition (with ``inspect``'s table of cuts) -> export the device segments (ONNX Runtime training artifacts,
TF.js when TensorFlow is installed) -> deploy -> ``splitexport serve`` in the background on loopback with a
generated token -> a device trains A and C in ONNX Runtime against it over HTTP -> the HTTP run is compared,
weight by weight, with the same training done monolithically in process, and both curves go into one PNG.
The server is a real child process; it is stopped at the end, on failure, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import torch

from . import models
from ._errors import SplitExportError

INPUT_SHAPE = "1,1,8,8"
LEARNING_RATES = {"mlp": 0.3, "resnet_cnn": 0.05}
"""Plain SGD (what the ONNX Runtime artifacts train with here) on digits, batch 32; the cuts are
:data:`splitexport.models.DEFAULT_CUTS`. The MLP is the default: its ORT devices stay within 1e-6 of
monolithic torch; in the BatchNorm ResNet float32 rounding differences between ORT and torch are amplified
by ReLU gates near zero (docs/onnx.md; measured 8.6e-2 after 258 steps)."""
BATCH_SIZE = 32
SERVER_START_S = 120.0


@dataclass
class DemoResult:
    """What the demo measured: the HTTP run, the monolithic run, and their largest weight difference."""

    http_accuracy: float
    monolithic_accuracy: float
    max_weight_difference: float
    where: str
    steps: int
    plot: Path
    metrics: Path


def run_demo(out: Path, cli: Callable[[Sequence[str]], None], *, model: str = "mlp", epochs: int = 6, seed: int = 0,
             tfjs: bool = True, progress: bool = True, log: Callable[[str], None] = print) -> DemoResult:
    """Walk the whole path into ``out`` (created; its previous demo files are replaced); ``cli`` runs one
    ``splitexport`` command in this process (``splitexport._cli.run``)."""

    def command(what: str, argv: Sequence[str]) -> None:
        """Print the step and the command a user would type, then run it."""
        log(f"\n{what}:\n$ splitexport {shlex.join(argv)}")
        cli(argv)

    needed = ("onnx", "onnxruntime", "fastapi", "uvicorn", "httpx", "safetensors", "sklearn", "matplotlib")
    missing = [m for m in needed if not installed(m)]
    if missing:
        raise SplitExportError(f"the demo needs the 'onnx', 'server' and 'sim' extras ({', '.join(missing)} missing): "
                               "pip install 'splitexport[onnx,server,sim]'")
    if model not in LEARNING_RATES:
        raise SplitExportError(f"unknown demo model {model!r}; choose from {sorted(LEARNING_RATES)}")
    out.mkdir(parents=True, exist_ok=True)
    lr, cuts = LEARNING_RATES[model], models.DEFAULT_CUTS[model]
    torch.manual_seed(seed)
    model_path = out / f"{model}.pt"
    torch.save(models.FACTORIES[model]().state_dict(), model_path)
    log(f"saved a freshly initialised splitexport.models.{model} to {model_path}")
    common = ["--arch", f"splitexport.models:{model}", "--input-shape", INPUT_SHAPE]
    bundle, assets = out / "bundle", out / "app-assets"

    command("1. every valid cut point of the model", ["inspect", str(model_path), *common])
    command("   cut it A|B|C: A and C train on the phone, B on the server",
             ["partition", str(model_path), *[a for c in cuts for a in ("--cut", c)], *common, "-o", str(bundle),
              "--optimizer", "sgd", "--lr", str(lr), "--momentum", "0", "--weight-decay", "0", "--force"])
    command("2. export A and C as ONNX Runtime on-device training artifacts",
             ["export", str(bundle), "--format", "onnx"])
    if not tfjs:
        log("   (TF.js export skipped: --no-tfjs)")
    elif not installed("tensorflowjs"):
        log("   TF.js export skipped: TensorFlow is not installed here. To export for the browser / React Native:\n"
            "     pip install 'splitexport[tf]'\n"
            f"     splitexport export {bundle} --format tfjs")
    else:
        command("   ... and as trainable TF.js models (browser, React Native, Node)",
                 ["export", str(bundle), "--format", "tfjs"])
    command("3. copy what the phone app ships (device segments only, hash-verified)",
             ["deploy", str(bundle), "--to", str(assets), "--force"])

    state_dir, tokens = out / "server-state", out / "tokens.txt"
    shutil.rmtree(state_dir, ignore_errors=True)  # B starts from the bundle, as the monolithic run does
    tokens.write_text(secrets.token_urlsafe(24) + "\n")
    tokens.chmod(0o600)
    port = free_port()
    serve = ["serve", str(bundle), "--port", str(port), "--state-dir", str(state_dir), "--tokens", str(tokens)]
    log(f"\n4. run the server for B in the background (a generated token in {tokens}):\n"
        f"$ splitexport {shlex.join(serve)} &")
    with _server(serve, port, out / "server.log") as url:
        log(f"   listening on {url} (log: {out / 'server.log'})")
        log(f"\n5. a device trains A and C in ONNX Runtime against it, {epochs} epochs of digits:\n"
            f"$ python -m device_runtime train --server {url} --bundle {assets} --runtime onnx "
            f"--epochs {epochs} --token \"$(cat {tokens})\"")
        http, device_weights, steps = _train_over_http(url, tokens.read_text().strip(), assets, epochs, seed, progress,
                                                       log)
    server_weights = _server_weights(bundle, state_dir)
    log(f"   server stopped; B's weights read back from {state_dir}")

    log("\n6. the same training monolithically in this process (plain backprop through the whole model):")
    mono, mono_weights = _train_monolithic(bundle, epochs, seed, progress, log)
    from ._trainer import max_abs_difference

    http_weights = {**device_weights, **server_weights}
    untracked = set(mono_weights) - set(http_weights)  # ORT keeps no BatchNorm step counters
    if any(not k.endswith("num_batches_tracked") for k in untracked):
        raise SplitExportError(f"the HTTP run has no weights for {sorted(untracked)[:3]}")
    diff, where = max_abs_difference(http_weights, {k: v for k, v in mono_weights.items() if k not in untracked})
    from .simulation.plots import plot_histories

    plot = plot_histories([http, mono], out / "demo.png",
                          title=f"{model} cut at {', '.join(cuts)}: ORT devices over HTTP vs monolithic")
    metrics = out / "metrics.json"
    metrics.write_text(json.dumps({"model": model, "epochs": epochs, "seed": seed, "batch_size": BATCH_SIZE, "lr": lr,
                                   "steps": steps, "max_weight_difference": diff, "where": where,
                                   "runs": [http.to_dict(), mono.to_dict()]}, indent=2))
    result = DemoResult(http.epochs[-1].test_accuracy, mono.epochs[-1].test_accuracy, diff, where, steps, plot,
                        metrics)
    log(f"\nfinal test accuracy {result.http_accuracy:.4f} (devices over HTTP), "
        f"{result.monolithic_accuracy:.4f} (monolithic)")
    log(f"max |HTTP - monolithic| over all weights and buffers after {steps} steps: {diff:.3e} ({where})")
    log(f"wrote {plot} and {metrics}")
    return result


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound (no server left listening on it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


_LAUNCH = """import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the demo dies, even by SIGKILL
if os.getppid() != int(sys.argv[1]):
    sys.exit("the demo exited before its server started")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""
"""Linux: the server process is started through this, so no server outlives the demo."""


@contextmanager
def _server(serve: Sequence[str], port: int, log_path: Path) -> Iterator[str]:
    """``splitexport serve`` as a child process, healthy on loopback; terminated (then killed) on the way out."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log_file, _sigterm_as_exit():
        proc = _spawn(["-m", "splitexport", *serve], log_file)
        try:
            deadline = time.monotonic() + SERVER_START_S
            while True:
                if proc.poll() is not None:
                    raise SplitExportError(f"the server exited with code {proc.returncode} before it was ready: "
                                           f"{_last_line(log_path)}")
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SplitExportError(f"the server did not answer on {url} within {SERVER_START_S:.0f} s; "
                                           f"see {log_path}")
                time.sleep(0.1)
            yield url
        finally:
            _stop(proc)


def _spawn(args: list[str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
    """``python ARGS`` as a child (tied to this process's life on Linux), output into ``log_file``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, *args]
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-c", _LAUNCH, str(os.getpid()), *args]
    return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn shuts down and checkpoints B), SIGKILL if that takes more than 30 s."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While the server runs, SIGTERM unwinds the demo (so the server is stopped) instead of ending it abruptly."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous: Any = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _train_over_http(url: str, token: str, assets: Path, epochs: int, seed: int, progress: bool,
                     log: Callable[[str], None]) -> tuple[Any, dict[str, torch.Tensor], int]:
    """The device side, as ``python -m device_runtime train`` runs it; returns the history and A's and C's weights."""
    from device_runtime import OrtRunner, ServerClient, build_split_model

    from ._bundle import load_bundle
    from ._trainer import fit
    from .simulation.data import load_dataset

    deployed = load_bundle(assets)
    client = ServerClient(url, token)
    try:
        torch.manual_seed(seed)
        model, remote = build_split_model(deployed, client, "onnx")
        log(f"   session {remote.session_id}")
        history = fit(model, load_dataset("digits"), name="ORT devices over HTTP", epochs=epochs,
                      batch_size=BATCH_SIZE, seed=seed, progress=progress, on_epoch=_epoch_line(log, "HTTP"))
        steps = remote.step
    finally:
        client.close()
    weights: dict[str, torch.Tensor] = {}
    for runner in model.runners:
        if isinstance(runner, OrtRunner):
            weights.update(runner.state_dict())
    return history, weights, steps


def _server_weights(bundle: Path, state_dir: Path) -> dict[str, torch.Tensor]:
    """B as the stopped server left it: restored from its state directory by the server's own code."""
    from server import ServerSettings, ServerState

    state = ServerState(ServerSettings(bundle=bundle, state_dir=state_dir, tokens="read-only-" + "0" * 16))
    try:
        if not state.resumed_from:
            raise SplitExportError(f"the server left no trained state in {state_dir}")
        return {k: v.detach().clone() for k, v in state.segment.module.state_dict().items()}
    finally:
        state.executor.shutdown()
        state.store.close()


def _train_monolithic(bundle_path: Path, epochs: int, seed: int, progress: bool,
                      log: Callable[[str], None]) -> tuple[Any, dict[str, torch.Tensor]]:
    from ._bundle import load_bundle
    from ._trainer import MonolithicModel, compose, fit, named_state
    from .simulation.data import load_dataset

    bundle = load_bundle(bundle_path)
    seq = compose([bundle.torch_segment(s.name) for s in bundle.manifest.segments])
    torch.manual_seed(seed)
    model = MonolithicModel(seq, bundle.manifest.optimizer, bundle.manifest.loss.kind)
    history = fit(model, load_dataset("digits"), name="monolithic (in process)", epochs=epochs,
                  batch_size=BATCH_SIZE, seed=seed, progress=progress, on_epoch=_epoch_line(log, "monolithic"))
    return history, named_state(list(seq))


def _epoch_line(log: Callable[[str], None], run: str) -> Callable[[Any], None]:
    from tqdm import tqdm

    def report(e: Any) -> None:
        line = f"   {run:>10} epoch {e.epoch}: train loss {e.train_loss:.4f}  test acc {e.test_accuracy:.4f}"
        if log is print:
            tqdm.write(line)
        else:
            log(line)

    return report
