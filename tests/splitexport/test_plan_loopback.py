"""The plan's predicted step time against a measured run: a real ``splitexport serve`` on loopback and a device
training A in ONNX Runtime, over a link that delays every request by what the plan's link model charges.

Method (docs/plan.md): the link is emulated in the device's HTTP transport: after each exchange it sleeps one
RTT plus (request body + response body) * 8 / bandwidth, which is the link term of the prediction. The device
and server compute, (de)serialisation, HTTP and uvicorn are real and measured end to end, so the comparison
tests the compute part of the prediction (device time from the ORT timing, server time from the torch timing)
and that nothing the plan leaves out (HTTP, encoding) is large. Both sides run with one thread, as the plan
times them; the server checkpoints every 1000 steps (the plan does not model checkpoint writes). The machine
running the tests is shared, so a busy moment can inflate one side: the plan and the run are measured
together up to twice, and one agreement within 25 % passes. The cut and batch make the device's compute about a
third of the step, so a plan without the device time (or without the RTT) fails.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import pytest
import torch

from device_runtime import RemoteSegment, ServerClient
from device_runtime._ort_runner import OrtRunner
from splitexport import OptimizerSpec, SourceSpec, SplitModel, load_dataset, partition, write_bundle
from splitexport._cli import main as cli
from splitexport._plan import DEVICE_PROFILES, Link, plan
from splitexport.models import resnet_cnn
from tests._support import TOKEN, ServerProcess

pytest.importorskip("onnxruntime.training")

BATCH, WARMUP, STEPS, ATTEMPTS = 64, 4, 16, 2
LINK = Link(bandwidth_bps=100e6, rtt_s=0.010)
CUT = "layer3"


class DelayedTransport(httpx.HTTPTransport):
    """An httpx transport that adds the link's time for each exchange (one RTT + both bodies over the bandwidth)."""

    def __init__(self, link: Link) -> None:
        super().__init__()
        self.link = link
        self.delayed_s = 0.0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        body = response.read()
        delay = self.link.time(1, len(request.content) + len(body))
        self.delayed_s += delay
        time.sleep(delay)
        return response


def test_predicted_step_time_matches_a_loopback_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnet_cnn()
    example = torch.zeros(1, 1, 8, 8)
    bundle = tmp_path / "bundle"
    write_bundle(partition(model, [CUT], example), bundle, optimizer=OptimizerSpec(name="sgd", lr=0.05),
                 source=SourceSpec(file_name="resnet.pt", sha256="0" * 64, kind="state_dict"))
    assert cli(["export", str(bundle), "--format", "onnx"]) == 0
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    server = ServerProcess(bundle, tmp_path / "state", tokens)
    server.args += ["--threads", "1", "--checkpoint-every", "1000"]
    server.start()
    data = load_dataset("digits")
    errors = []
    try:
        client = ServerClient(server.url, TOKEN)
        transport = DelayedTransport(LINK)
        client.http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                   transport=transport, timeout=30)
        split = SplitModel([OrtRunner.from_bundle(bundle, "A", threads=1), RemoteSegment(client)])
        for attempt in range(ATTEMPTS):  # the machine is shared: a busy moment can skew one side of the comparison
            predicted = plan(model, example, batch=BATCH, train_samples=1347, link=LINK,
                             profile=DEVICE_PROFILES["host"], threads=1, reps=7)
            cand = next(c for c in predicted.candidates if c.cuts == (CUT,))
            times, server_ms = [], []
            transport.delayed_s = 0.0
            for i in range(WARMUP + STEPS):
                lo = (attempt * (WARMUP + STEPS) + i) * BATCH % (len(data.x_train) - BATCH)
                x, y = data.x_train[lo:lo + BATCH], data.y_train[lo:lo + BATCH]
                start = time.perf_counter()
                split.step(x, y)
                times.append(time.perf_counter() - start)
                server_ms.append(client.server_timing.get("total", 0.0))
            measured = statistics.median(times[WARMUP:])
            link_part = LINK.time(1, cand.bytes_up["float32"] + cand.bytes_down["float32"])
            assert transport.delayed_s / (WARMUP + STEPS) == pytest.approx(link_part, rel=0.02)  # the planned bytes
            error = abs(cand.step_time_s["float32"] - measured) / measured
            errors.append(error)
            print(f"\nplan vs loopback (attempt {attempt + 1}), resnet_cnn cut {CUT}, batch {BATCH}, 100 Mbit/s, "
                  f"RTT 10 ms: predicted {cand.step_time_s['float32'] * 1e3:.1f} ms (device "
                  f"{cand.device_time_s * 1e3:.1f}, server {cand.server_time_s * 1e3:.1f}, link {link_part * 1e3:.1f}), "
                  f"measured median {measured * 1e3:.1f} ms (server-side {statistics.median(server_ms[WARMUP:]):.1f} "
                  f"ms), error {error:.0%}")
            if error < 0.25:
                break
        client.close()
    finally:
        server.stop()
    assert min(errors) < 0.25, errors
