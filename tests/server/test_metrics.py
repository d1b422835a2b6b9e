"""/metrics: Prometheus text with HELP, the server's counters and Server-Timing phase histograms."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from device_runtime import RemoteSegment, ServerClient
from tests._support import TOKEN, threaded_server


def test_metrics_have_help_counters_and_phase_histograms(mlp_bundle: Path, tmp_path: Path) -> None:
    with threaded_server(mlp_bundle, tmp_path / "s") as (url, _):
        remote = RemoteSegment(ServerClient(url, TOKEN))
        for _ in range(3):
            remote.forward(torch.randn(4, 64))
            remote.train_with_gradient(torch.ones(4, 64))
        r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert all(f.documentation for f in families.values())
    assert "# HELP splitexport_steps_applied_total" in r.text
    steps = families["splitexport_steps_applied"]
    assert steps.type == "counter" and steps.samples[0].value == 3
    assert families["splitexport_sessions_active"].samples[0].value == 1
    hist = families["splitexport_call_phase_seconds"]
    assert hist.type == "histogram"
    counts = {(s.labels["call"], s.labels["phase"]): s.value for s in hist.samples if s.name.endswith("_count")}
    for call in ("forward", "backward"):
        for phase in ("decode", "b", "encode", "total"):
            assert counts[(call, phase)] == 3, (call, phase)
    assert counts[("backward", "checkpoint")] == 3  # every step is committed
    assert ("forward", "checkpoint") not in counts
