"""Samples/s of N concurrent HTTP devices: B batched per iteration (PSL, SGLR) vs one device at a time.

    python benchmarks/bench_multiclient_http.py [--clients 16] [--steps 20] [--batch 16] [--repeats 3] \\
        [--models mlp resnet_cnn] [--json out.json] [--smoke]

For each example model (double split A | B | C at the default cuts) and each server mode it
starts ``splitexport serve`` as a child process (real uvicorn on loopback) and runs ``--clients``
device threads in this process, each with its own session, connection and torch A and C:

* ``sequential``: the server without ``--strategy``; each device's forward takes B's lease until
  its backward, so B steps happen one device at a time (SSL-style).
* ``psl``: ``--strategy psl``; an iteration's forwards are collected at a barrier and B runs once
  over the concatenated batch, then once for the backward.
* ``sglr``: ``--strategy sglr --alpha 0.5 --phi 0.5`` (PSL + SplitLr + SplitAvg).

Every device takes ``--steps`` timed steps (after 2 untimed warm-up steps) on random digits-shaped
batches; samples/s = devices * steps * batch / wall time. The modes run interleaved ``--repeats``
times (a fresh server each run) and the table shows the median, so load from other processes hits
every mode alike. Checkpoints are off in every mode (``--checkpoint-every`` larger than the run) so
the comparison is about B's steps, not disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine

from device_runtime import RemoteSegment, ServerClient
from splitexport import OptimizerSpec, SplitModel, TorchSegment, load_bundle
from splitexport.models import DEFAULT_CUTS, FACTORIES
from tests._support import ServerProcess, build_bundle

TOKEN = "bench-token-0123456789"
MODES: dict[str, list[str]] = {
    "sequential": [],
    "psl": ["--strategy", "psl"],
    "sglr": ["--strategy", "sglr", "--alpha", "0.5", "--phi", "0.5"],
}


def make_bundle(model: str, path: Path) -> Path:
    return build_bundle(path, model, DEFAULT_CUTS[model], OptimizerSpec(name="sgd", lr=0.05, momentum=0.9)).path


def run_mode(bundle_path: Path, mode: str, clients: int, steps: int, batch: int, work: Path) -> dict[str, float]:
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    tokens = work / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    extra = MODES[mode] + (["--clients", str(clients), "--round-timeout", "300"] if MODES[mode] else [])
    state_dir = Path(tempfile.mkdtemp(prefix=f"state-{mode}-", dir=work))
    server = ServerProcess(bundle_path, state_dir, tokens, "--checkpoint-every", "1000000000", *extra,
                           timeout_s=120).start()
    shape = m.segments[0].input.sample_shape
    ready = threading.Barrier(clients)
    start = threading.Barrier(clients + 1)
    errors: list[BaseException] = []
    retries: list[int] = []

    def device(i: int) -> None:
        try:
            client = ServerClient(server.url, TOKEN, timeout=120, max_wait_s=300)
            remote = RemoteSegment(client)
            runners = [remote if s.role == "server" else
                       TorchSegment(bundle.torch_segment(s.name), m.optimizer, loss=m.loss.kind, input_grad=s.index > 0)
                       for s in m.segments]
            model = SplitModel(runners)
            gen = torch.Generator().manual_seed(i)
            data = [(torch.rand(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
                    for _ in range(steps + 2)]
            ready.wait()  # every device is built before the first iteration opens
            for x, y in data[:2]:
                model.step(x, y)
            start.wait()
            for x, y in data[2:]:
                model.step(x, y)
            retries.append(client.retries)
            client.close()
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)
            ready.abort()
            start.abort()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        try:
            start.wait()
        except threading.BrokenBarrierError:
            for t in threads:
                t.join()
            raise RuntimeError(f"{mode}: {len(errors)} devices failed: {errors[0]!r}") from errors[0]
        t0, cpu0, dev0 = time.perf_counter(), server.cpu_s(), _own_cpu_s()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server_cpu, device_cpu = server.cpu_s() - cpu0, _own_cpu_s() - dev0
        steps_applied = httpx.get(server.url + "/healthz").json()["steps_applied"]
    finally:
        server.stop()
    if errors:
        raise RuntimeError(f"{mode}: {len(errors)} devices failed: {errors[0]!r}")
    samples = clients * steps * batch
    return {"samples_per_s": samples / wall, "wall_s": wall, "samples": samples, "b_steps": steps_applied,
            "server_cpu_us_per_sample": 1e6 * server_cpu / samples,
            "device_cpu_us_per_sample": 1e6 * device_cpu / samples, "retries": sum(retries)}


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per device")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--models", nargs="+", default=["mlp", "resnet_cnn"], choices=sorted(FACTORIES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode; the median is reported")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="seconds: 2 devices, 2 steps, the MLP, one run per mode")
    args = p.parse_args()
    if args.smoke:
        args.clients, args.steps, args.models, args.repeats = 2, 2, ["mlp"], 1
    torch.set_num_threads(1)  # the devices share this process; the server has its own
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            bundle = make_bundle(model, Path(tmp) / model)
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes}
            for _ in range(args.repeats):
                for mode in args.modes:
                    runs[mode].append(run_mode(bundle, mode, args.clients, args.steps, args.batch, Path(tmp) / model))
            results: dict[str, dict[str, Any]] = {mode: {**min(rs, key=lambda r: abs(r["samples_per_s"] - statistics.median(
                x["samples_per_s"] for x in rs))), "all_samples_per_s": [r["samples_per_s"] for r in rs]}
                for mode, rs in runs.items()}
            base = results.get("sequential", {}).get("samples_per_s")
            for mode, r in results.items():
                r["ratio"] = r["samples_per_s"] / base if base else float("nan")
                rows.append({"model": model, "mode": mode, **r})
    info = machine()
    print(f"{args.clients} devices x {args.steps} steps x batch {args.batch}, median of {args.repeats}; "
          f"{info['cpu']}, {info['cores']} CPUs, load {os.getloadavg()[0]:.1f}, torch {info['torch']}")
    print(f"{'model':<12} {'server':<11} {'samples/s':>10} {'vs sequential':>14} {'B steps':>8} {'wall s':>7} "
          f"{'CPU us/sample server':>21} {'devices':>8}  runs (samples/s)")
    for r in rows:
        every = " ".join(f"{v:.0f}" for v in r["all_samples_per_s"])
        print(f"{r['model']:<12} {r['mode']:<11} {r['samples_per_s']:>10.0f} {r['ratio']:>13.2f}x "
              f"{r['b_steps']:>8} {r['wall_s']:>7.2f} {r['server_cpu_us_per_sample']:>21.0f} "
              f"{r['device_cpu_us_per_sample']:>8.0f}  {every}")
    if args.json is not None:
        args.json.write_text(json.dumps({"clients": args.clients, "steps": args.steps, "batch": args.batch,
                                         "machine": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
