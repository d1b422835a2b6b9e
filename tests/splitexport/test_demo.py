"""``splitexport demo`` end to end in a real process: partition, export, deploy, a real ``serve`` child, ORT
devices over HTTP, the weight comparison with monolithic training; no server left behind, also after Ctrl-C."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splitexport._demo import port_is_free

pytest.importorskip("onnxruntime.training")
pytest.importorskip("uvicorn")

SERVE_LINE = re.compile(r"^\$ splitexport serve (?P<bundle>\S+) --port (?P<port>\d+) ")
ACCURACY_LINE = re.compile(r"^final test accuracy (?P<http>[0-9.]+) \(devices over HTTP\), (?P<mono>[0-9.]+) \(monolithic\)$")
DIFF_LINE = re.compile(r"^max \|HTTP - monolithic\| over all weights and buffers after (?P<steps>\d+) steps: "
                       r"(?P<diff>\S+) \((?P<where>[\w.]+)\)$")


WITHOUT_TF = "import sys\nfor m in ('tensorflow', 'tensorflowjs', 'tf_keras', 'ai_edge_litert'): sys.modules[m] = None\n"
"""As after `make demo`: TensorFlow cannot be imported (the server child needs none)."""


def demo(out: Path, *extra: str) -> subprocess.Popen[str]:
    code = WITHOUT_TF + "from splitexport._cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "demo", "--out", str(out), "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def servers_of(bundle: str) -> list[int]:
    """PIDs of live processes running ``serve`` on this bundle (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if b"serve" in cmd and bundle.encode() in cmd and "State:\tZ" not in status:
            pids.append(int(entry.name))
    return pids


def serve_port(lines: list[str]) -> tuple[str, int]:
    match = next(m for m in map(SERVE_LINE.match, lines) if m)
    return match["bundle"], int(match["port"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_demo_end_to_end(tmp_path: Path) -> None:
    proc = demo(tmp_path / "demo", "--epochs", "4")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    lines = stdout.splitlines()
    for step in ("$ splitexport inspect", "$ splitexport partition", "$ splitexport export", "$ splitexport deploy",
                 "$ splitexport serve", "$ python -m device_runtime train"):
        assert any(ln.startswith(step) for ln in lines), step
    assert "valid cut points" in stdout and "relu2" in stdout  # inspect's table
    assert "TF.js export skipped: TensorFlow is not installed" in stdout and "pip install 'splitexport[tf]'" in stdout

    acc = next(m for m in map(ACCURACY_LINE.match, lines) if m)
    diff = next(m for m in map(DIFF_LINE.match, lines) if m)
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    http, mono = metrics["runs"]
    assert float(acc["http"]) == pytest.approx(http["epochs"][-1]["test_accuracy"], abs=5e-5)
    assert float(acc["mono"]) == pytest.approx(mono["epochs"][-1]["test_accuracy"], abs=5e-5)
    assert float(acc["http"]) >= 0.85, stdout  # measured 0.909 after 4 epochs
    assert math.isfinite(float(diff["diff"])) and float(diff["diff"]) <= 1e-5, diff.group(0)  # measured 3.9e-7
    assert float(diff["diff"]) == pytest.approx(metrics["max_weight_difference"], rel=1e-3)
    assert int(diff["steps"]) == metrics["steps"] == 4 * 43  # every step of every epoch reached the server
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bundle, port = serve_port(lines)
    assert servers_of(bundle) == []
    assert port_is_free(port)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)],
                         ids=["ctrl-c", "sigterm"])
def test_interrupted_demo_stops_the_server(tmp_path: Path, signum: signal.Signals, code: int) -> None:
    proc = demo(tmp_path / "demo", "--epochs", "50")
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:  # wait until the server answers and training has started
        lines.append(line.rstrip("\n"))
        if line.strip().startswith("session "):
            break
    bundle, port = serve_port(lines)
    assert len(servers_of(bundle)) == 1 and not port_is_free(port)
    proc.send_signal(signum)  # to the demo only: the demo must stop its server
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    if signum == signal.SIGINT:
        assert stderr.strip().splitlines()[-1] == "splitexport: interrupted"
    assert servers_of(bundle) == []
    assert port_is_free(port)
