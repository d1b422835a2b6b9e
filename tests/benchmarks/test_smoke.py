"""Every script in benchmarks/ runs (``--smoke``: tiny sizes, seconds of CPU) and prints its table.

The numbers in README.md and docs/ come from these scripts (or from tests that print them); this keeps
the scripts runnable. The full runs are too long for CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "bench_ort_train_step.py": "| mlp | A | 8 |",
    "bench_protocol.py": "| mlp | 8 | F16 |",
    "bench_multiclient_http.py": "sequential",
    "strategies_report.py": "wrote ",
    "fp16_subnormals.py": "| resnet_cnn |",
    "float32_drift.py": "threads 1 vs 2",
    "bench_safetensors_header.py": "5000 tensors: 413 header_too_large",
    "bench_server_state.py": "server CPU",
    "privacy_leakage.py": "| mlp, untrained | fc1 |",
    "bench_replicas.py": "| 2 | [4, 4] |",
    "zoo_table.py": "| zoo model (`tests/zoo.py`) |",
    "profile_event_loop.py": "event-loop thread CPU per step, profiled",
}


def test_every_script_is_smoke_tested() -> None:
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_smoke(script: str, tmp_path: Path) -> None:
    args = ["--out", str(tmp_path)] if script == "strategies_report.py" else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args], check=False,
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert SCRIPTS[script] in res.stdout, res.stdout[-3000:]
