"""Per-step cost of the server protocol, and the same tensors encoded the way SplitEasy did.

    python benchmarks/bench_protocol.py [--models mlp resnet_cnn] [--batches 32 128] [--steps 50]
                                        [--checkpoint-every 1] [--json out.json] [--smoke]

For each example model (default cuts, A|B|C) and batch size, ``splitexport serve`` runs in a child
process on loopback; this process is the device: A and C in ONNX Runtime (``OrtRunner``), B through
``RemoteSegment``, trained on digits batches, with float32 and then float16 transport. Per step (median
over ``--steps`` after ``--warmup``):

* device: ORT A forward + A train step + C train step (label loss, input gradient).
* server B: the ``b`` phase of the forward and backward calls' ``Server-Timing`` (B forward, aux-loss
  backward, optimizer step; waiting for the lease, none here).
* server codec: ``Server-Timing`` ``decode`` (read, sha256, parse, validate) + ``encode``.
* checkpoint: ``Server-Timing`` ``checkpoint`` (``--checkpoint-every 1``, the default, writes one per step).
* client codec: safetensors encode of the two requests and decode of the two responses with
  device_runtime's functions, timed on the step's tensors.
* transport: the rest of the two calls' round trips (HTTP over loopback TCP, uvicorn and FastAPI,
  the hand-off to the worker thread).
* bytes: request and response bodies plus HTTP headers as httpx sends and receives them; raw: the
  four tensors' float32 bytes.

SplitEasy (github.com/kamalesh0406/SplitEasy, ``server/restserver.py`` and the React Native client):
device -> server ``JSON.stringify({"inputs" | "gradients": nested lists})`` uncompressed; server ->
device ``orjson.dumps(nested lists)`` gzip level 4 (``mgzip``; stdlib ``gzip``, the same format, here);
decoding parses the JSON (gunzipping the responses) into float32 arrays. The four tensors of each step
are encoded both ways in this run; ratios are ours / SplitEasy. ``orjson`` is used if installed
(SplitEasy's server used it), else the stdlib ``json`` with compact separators (the same bytes, slower).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine

from device_runtime import OrtRunner, RemoteSegment, ServerClient
from device_runtime._client import decode as client_decode
from device_runtime._client import encode as client_encode
from server._wire import decode as server_decode
from server._wire import encode as server_encode
from splitexport import Bundle, OptimizerSpec, load_dataset
from splitexport.export import export_onnx
from splitexport.models import DEFAULT_CUTS, FACTORIES
from splitexport.simulation.data import batch_indices
from tests._support import ServerProcess, build_bundle

try:
    import orjson

    def json_dumps(obj: object) -> bytes:
        return orjson.dumps(obj)

    json_loads: Callable[[bytes], Any] = orjson.loads
    JSON_LIB = f"orjson {orjson.__version__}"
except ImportError:  # the same bytes, slower

    def json_dumps(obj: object) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    json_loads = json.loads
    JSON_LIB = "stdlib json"


# -- wire bytes as httpx sees them ------------------------------------------------------------------


class WireCounter:
    """Bytes of request and response lines, headers and bodies of one httpx client."""

    def __init__(self, http: httpx.Client) -> None:
        self.bytes = 0
        http.event_hooks = {"request": [self._request], "response": [self._response]}

    @staticmethod
    def _headers(headers: httpx.Headers) -> int:
        return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2

    def _request(self, request: httpx.Request) -> None:
        line = len(request.method) + len(request.url.raw_path) + len(" HTTP/1.1\r\n") + 1
        self.bytes += line + self._headers(request.headers) + len(request.content)

    def _response(self, response: httpx.Response) -> None:
        line = len(f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n")
        self.bytes += line + self._headers(response.headers) + int(response.headers.get("content-length", 0))


# -- codecs -----------------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def ours(requests: dict[str, np.ndarray], responses: dict[str, torch.Tensor], fp16: bool) -> tuple[int, float, float]:
    """(body bytes, device-side seconds, server-side seconds) of the step's four messages in safetensors."""
    size, device_s, server_s = 0, 0.0, 0.0
    for name, a in requests.items():  # device encodes, server decodes
        body, t = timed(client_encode, {name: a}, fp16)
        _, u = timed(server_decode, body)
        size, device_s, server_s = size + len(body), device_s + t, server_s + u
    for name, tensor in responses.items():  # server encodes, device decodes
        body, t = timed(server_encode, {name: tensor}, np.float16 if fp16 else np.float32)
        _, u = timed(client_decode, body)
        size, device_s, server_s = size + len(body), device_s + u, server_s + t
    return size, device_s, server_s


def _json_request(key: str, a: np.ndarray) -> bytes:
    return json_dumps({key: a.tolist()})  # JSON.stringify({key: tensor.arraySync()}) on the device


def _parse_request(key: str, body: bytes) -> torch.Tensor:
    return torch.Tensor(json_loads(body)[key])  # orjson.loads + torch.Tensor on the server


def _json_response(key: str, t: torch.Tensor) -> bytes:
    return gzip.compress(json_dumps({key: t.numpy().tolist()}), 4)  # orjson.dumps + mgzip level 4


def _parse_response(key: str, body: bytes) -> np.ndarray:
    return np.asarray(json_loads(gzip.decompress(body))[key], dtype=np.float32)  # gunzip + JSON.parse + tf.tensor


def spliteasy(requests: dict[str, np.ndarray], responses: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(body bytes, encode + decode seconds) of the same four messages as SplitEasy sent them."""
    size, seconds = 0, 0.0
    for name, a in requests.items():
        key = "inputs" if name == "activation" else "gradients"
        body, t = timed(_json_request, key, a)
        _, u = timed(_parse_request, key, body)
        size, seconds = size + len(body), seconds + t + u
    for name, tensor in responses.items():
        key = "inputs" if name == "output" else "gradients"
        body, t = timed(_json_response, key, tensor)
        _, u = timed(_parse_response, key, body)
        size, seconds = size + len(body), seconds + t + u
    return size, seconds


# -- one configuration -------------------------------------------------------------------------------


def run(bundle: Bundle, server: ServerProcess, batch: int, fp16: bool, steps: int, warmup: int,
        threads: int) -> dict[str, float]:
    data = load_dataset("digits")
    a = OrtRunner.from_bundle(bundle, "A", threads=threads or None)
    c = OrtRunner.from_bundle(bundle, "C", threads=threads or None)
    client = ServerClient(server.url)
    wire = WireCounter(client.http)
    remote = RemoteSegment(client, fp16=fp16)
    order = [idx for epoch in range(20) for idx in batch_indices(len(data.x_train), batch, seed=0, epoch=epoch)
             if len(idx) == batch]
    rows: list[dict[str, float]] = []
    for i in range(warmup + steps):
        idx = order[i % len(order)]
        x, y = data.x_train[idx], data.y_train[idx]
        wire.bytes = 0
        t0 = time.perf_counter()
        act = a.forward(x)
        t1 = time.perf_counter()
        out = remote.forward(act)
        t2 = time.perf_counter()
        fwd = client.server_timing
        _, g_c, _ = c.train_with_labels(out, y)
        assert g_c is not None
        t3 = time.perf_counter()
        g_b = remote.train_with_gradient(g_c)
        assert g_b is not None
        t4 = time.perf_counter()
        bwd = client.server_timing
        a.train_with_gradient(g_b)
        t5 = time.perf_counter()
        if i < warmup:
            continue
        requests = {"activation": act.numpy(), "grad": g_c.numpy()}
        responses = {"output": out, "grad": g_b}
        body, client_s, server_s = ours(requests, responses, fp16)
        se_bytes, se_s = spliteasy(requests, responses)
        server_total = fwd["total"] + bwd["total"]
        rows.append({
            "step_ms": 1e3 * (t5 - t0),
            "device_ms": 1e3 * ((t1 - t0) + (t3 - t2) + (t5 - t4)),
            "server_b_ms": fwd["b"] + bwd["b"],
            "server_codec_ms": sum(t.get(k, 0.0) for t in (fwd, bwd) for k in ("decode", "encode")),
            "checkpoint_ms": fwd.get("checkpoint", 0.0) + bwd.get("checkpoint", 0.0),
            "client_codec_ms": 1e3 * client_s,
            "transport_ms": 1e3 * ((t2 - t1) + (t4 - t3) - client_s) - server_total,
            "wire_bytes": wire.bytes,
            "body_bytes": body,
            "raw_bytes": sum(v.nbytes for v in requests.values()) + sum(4 * v.numel() for v in responses.values()),
            "spliteasy_bytes": se_bytes,
            "ours_codec_ms": 1e3 * (client_s + server_s),
            "spliteasy_codec_ms": 1e3 * se_s,
        })
    client.close()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def make_bundle(name: str, work: Path) -> Bundle:
    return export_onnx(build_bundle(work / name, name, DEFAULT_CUTS[name], OptimizerSpec(name="sgd", lr=0.01)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "resnet_cnn"], choices=sorted(FACTORIES))
    p.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of both processes and ORT intra-op threads (0: the libraries' defaults)")
    p.add_argument("--json", type=Path, help="also write the rows and the machine description here")
    p.add_argument("--smoke", action="store_true", help="seconds: the MLP, batch 8, 3 steps (checks the script runs)")
    args = p.parse_args()
    if args.smoke:
        args.models, args.batches, args.steps, args.warmup = ["mlp"], [8], 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(onnxruntime=onnxruntime.__version__, json=JSON_LIB, threads=str(args.threads or "default"))
    print(f"# {info}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bundle = make_bundle(name, Path(tmp))
            server = ServerProcess(
                bundle.path, Path(tmp) / f"state-{name}", None, "--checkpoint-every", str(args.checkpoint_every),
                "--log-level", "warning", timeout_s=120,
                env={"OMP_NUM_THREADS": str(args.threads)} if args.threads else None,
            ).start()
            try:
                for batch in args.batches:
                    for fp16 in (False, True):
                        r = run(bundle, server, batch, fp16, args.steps, args.warmup, args.threads)
                        rows.append({"model": name, "batch": batch, "transport": "F16" if fp16 else "F32", **r})
                        print(f"# {rows[-1]}", flush=True)
            finally:
                server.stop()
    print("\nPer step, median ms (device = ORT A+C; server B, server codec and checkpoint from Server-Timing):\n")
    print("| model | batch | wire | step | device | server B | server codec | checkpoint | client codec | transport |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['transport']} | {r['step_ms']:.2f} | {r['device_ms']:.2f} | "
              f"{r['server_b_ms']:.2f} | {r['server_codec_ms']:.2f} | {r['checkpoint_ms']:.2f} | "
              f"{r['client_codec_ms']:.2f} | {r['transport_ms']:.2f} |")
    print(f"\nBytes and encode+decode (both ends, 4 messages) per step, ours vs SplitEasy (JSON lists; {JSON_LIB}):\n")
    print("| model | batch | wire | raw tensors | ours on the wire | ours bodies | SplitEasy bodies | bytes ours/SE | "
          "codec ours (ms) | codec SE (ms) | time ours/SE |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['transport']} | {r['raw_bytes']:.0f} | {r['wire_bytes']:.0f} | "
              f"{r['body_bytes']:.0f} | {r['spliteasy_bytes']:.0f} | {r['body_bytes'] / r['spliteasy_bytes']:.3f} | "
              f"{r['ours_codec_ms']:.3f} | {r['spliteasy_codec_ms']:.2f} | "
              f"{r['ours_codec_ms'] / r['spliteasy_codec_ms']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
