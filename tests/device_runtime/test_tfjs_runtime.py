"""The JS device runtime (device_runtime/js) under Node: equivalence with torch and its unit tests.

Writes the TF.js fixtures in process, then runs ``node --test`` on device_runtime/js/test
(which also holds pure-JS unit tests); the node tests compare with torch themselves and
report their numbers, which this test checks again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.device_runtime.tfjs_fixtures import write_fixtures
from tests.tf_reference import CASES, STATS_TOL, TOL

JS = Path(__file__).resolve().parents[2] / "device_runtime" / "js"


def test_js_runtime_matches_torch(tmp_path: Path) -> None:
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    pytest.importorskip("tensorflowjs")
    node = shutil.which("node")
    assert node, "node (>= 18) is required for the JS device runtime tests"
    assert (JS / "node_modules" / "@tensorflow" / "tfjs").is_dir(), f"run `npm ci --prefix {JS}` first"
    write_fixtures(tmp_path / "fixtures")
    results = tmp_path / "results.jsonl"
    env = {
        **os.environ,
        "SPLITEXPORT_TFJS_FIXTURES": str(tmp_path / "fixtures"),
        "SPLITEXPORT_TFJS_RESULTS": str(results),
        "SPLITEXPORT_JS_E2E": "0",  # the HTTP end-to-end test runs in `npm test` (make test), not twice
    }
    proc = subprocess.run(
        [node, "--test", "test/"], cwd=JS, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(rows) == {c.name for c in CASES}
    for case in CASES:
        r = rows[case.name]
        print(f"\n{case.name} tfjs: free-running {r['free']} | per step {r['per_step']}")
        assert max(r["per_step"].values()) <= TOL
        if not case.kinks:
            free = r["free"]
            assert free["weights"] <= TOL and free["grad_input"] <= TOL and free["running_stats"] <= STATS_TOL
