"""Samples/s and server CPU per sample of a replicated B: one server process vs ``--replicas 2`` (issue 15).

    python benchmarks/bench_replicas.py [--smoke] [--devices 32] [--steps 20] [--batch 16] [--model resnet_cnn] \\
        [--repeats 3] [--json out.json]

``splitexport serve --strategy psl --clients D --threads 1`` runs as a child process on loopback, either alone
(``1``) or as ``--replicas 2`` (two spawned ranks on gloo, rank r on port + r; the devices open their sessions at
rank 0 and half of them are redirected to rank 1). ``D`` device threads in this process each send a fixed
activation and labels per step (single split A | B: no device compute, so the devices cost only HTTP). After 2
untimed warm-up iterations every device takes ``--steps`` timed iterations:

* samples/s = devices * steps * batch / wall time;
* server CPU per sample = the user + system CPU seconds of every server process (the launcher and its ranks,
  ``/proc/PID/stat``) over the timed steps, divided by the samples;
* RSS per rank: the resident memory of one serving process (VmRSS, shared library pages included).

The two configurations run interleaved ``--repeats`` times (fresh servers) and the table shows the medians.
Checkpoints are off (``--checkpoint-every`` larger than the run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
from splitexport import OptimizerSpec, SourceSpec, partition, write_bundle
from splitexport.models import FACTORIES
from tests._support import free_port

TOKEN = "bench-token-0123456789"
CUTS = {"mlp": ["relu1"], "resnet_cnn": ["layer1"]}


def make_bundle(model: str, path: Path) -> Path:
    torch.manual_seed(0)
    part = partition(FACTORIES[model](), CUTS[model], torch.zeros(2, 1, 8, 8))
    write_bundle(part, path, source=SourceSpec(file_name=f"{model}.pt", sha256="0" * 64, kind="state_dict"),
                 optimizer=OptimizerSpec(name="sgd", lr=0.01, momentum=0.9))
    return path


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_mb(pids: list[int]) -> float:
    """Resident memory of ``pids`` in MiB (VmRSS; shared pages count in every process)."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Server:
    def __init__(self, bundle: Path, state: Path, devices: int, replicas: int) -> None:
        port = free_port()
        while replicas > 1 and not _free(port + 1):
            port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        tokens = state / "tokens"
        state.mkdir(parents=True, exist_ok=True)
        tokens.write_text(TOKEN + "\n")
        args = [sys.executable, "-m", "splitexport", "serve", str(bundle), "--port", str(port), "--state-dir",
                str(state), "--tokens", str(tokens), "--strategy", "psl", "--clients", str(devices), "--threads", "1",
                "--checkpoint-every", "100000000", "--round-timeout", "60"]
        if replicas > 1:
            args += ["--replicas", str(replicas)]
        self.proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        urls = [f"http://127.0.0.1:{port + r}" for r in range(replicas)]
        deadline = time.monotonic() + 180
        for url in urls:
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the server did not start")
                time.sleep(0.1)
        self.pids = descendants(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for p in descendants(self.proc.pid):
                    os.kill(p, 9)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run(bundle: Path, root: Path, devices: int, replicas: int, steps: int, batch: int,
        shape: tuple[int, ...]) -> dict[str, Any]:
    server = Server(bundle, root, devices, replicas)
    try:
        remotes = [RemoteSegment(ServerClient(server.url, TOKEN, timeout=300, max_wait_s=300)) for _ in range(devices)]
        x = torch.randn(batch, *shape)
        y = torch.randint(0, 10, (batch,))
        on_rank = sorted(str(r.client.http.base_url) for r in remotes)

        def device(r: RemoteSegment, first: int, n: int) -> None:
            for step in range(first, first + n):
                r.participates(step)
                r.train_with_labels(x, y)

        def iterations(first: int, n: int) -> None:
            threads = [threading.Thread(target=device, args=(r, first, n)) for r in remotes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        iterations(0, 2)  # warm-up
        c0, t0 = cpu_s(server.pids), time.perf_counter()
        iterations(2, steps)
        wall, cpu = time.perf_counter() - t0, cpu_s(server.pids) - c0
        ranks = [p for p in server.pids if b"spawn_main" in _cmdline(p)] or [server.proc.pid]
        rss = rss_mb(ranks) / len(ranks)
        for r in remotes:
            r.client.close()
    finally:
        server.stop()
    samples = devices * steps * batch
    return {"replicas": replicas, "samples_per_s": samples / wall, "server_cpu_ms_per_sample": cpu / samples * 1e3,
            "wall_s": wall, "rss_mb_per_rank": rss, "sessions_per_replica": {u: on_rank.count(u) for u in sorted(set(on_rank))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", choices=sorted(CUTS), default="resnet_cnn")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="8 devices, mlp, 2 steps, 1 repeat")
    args = ap.parse_args()
    if args.smoke:
        args.devices, args.steps, args.model, args.repeats = 8, 2, "mlp", 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = make_bundle(args.model, root / "bundle")
        from splitexport import load_bundle

        shape = tuple(load_bundle(bundle).manifest.server_segments[0].input.sample_shape)
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for rep in range(args.repeats):
            for replicas in (1, 2):
                runs[replicas].append(run(bundle, root / f"s{rep}-{replicas}", args.devices, replicas, args.steps,
                                          args.batch, shape))
    rows = [{"replicas": n, "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
             "server_cpu_ms_per_sample": statistics.median(r["server_cpu_ms_per_sample"] for r in rs),
             "rss_mb_per_rank": statistics.median(r["rss_mb_per_rank"] for r in rs),
             "sessions_per_replica": list(rs[0]["sessions_per_replica"].values())} for n, rs in runs.items()]
    result = {"machine": machine(), "model": args.model, "devices": args.devices, "steps": args.steps,
              "batch": args.batch, "repeats": args.repeats, "rows": rows, "runs": runs}
    print(f"psl, {args.model} (A | B), {args.devices} devices x batch {args.batch}, {args.steps} iterations, "
          f"median of {args.repeats}; {result['machine']['cores']} cores")
    print("| replicas | sessions per replica | samples/s | server CPU ms/sample | RSS per rank MiB |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['replicas']} | {r['sessions_per_replica']} | {r['samples_per_s']:.0f} | "
              f"{r['server_cpu_ms_per_sample']:.3f} | {r['rss_mb_per_rank']:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
