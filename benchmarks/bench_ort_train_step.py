"""ONNX Runtime train step vs torch forward + backward for the device segments A and C.

    python benchmarks/bench_ort_train_step.py [--batches 8 32 128] [--repeats 30] [--json out.json] [--smoke]

For each example model (default cuts, double split) and batch size it times, as
the median of ``--repeats`` runs after warm-up:

* A, ORT: ``forward`` (activation to send) and ``train_with_gradient`` (step incl. optimizer).
* A, torch: train-mode forward, and the aux-loss backward + SGD step on it.
* C, ORT: ``train_with_labels`` (forward, loss, backward, optimizer, dL/d(input)).
* C, torch: forward + cross-entropy + backward (with the input gradient) + SGD step.

Both run on the CPU with their default thread pools.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine

from device_runtime import OrtSegment
from splitexport import OptimizerSpec, SourceSpec, aux_loss, label_loss, partition, write_bundle
from splitexport.export import export_onnx
from splitexport.models import DEFAULT_CUTS, FACTORIES


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _torch_aux_step(module: torch.nn.Module, sgd: torch.optim.Optimizer, x: torch.Tensor, g: torch.Tensor) -> None:
    out = module(x)
    sgd.zero_grad(set_to_none=True)
    aux_loss(out, g).backward()
    sgd.step()


def _torch_label_step(module: torch.nn.Module, sgd: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    xin = x.detach().requires_grad_(True)  # C also returns dL/d(input)
    loss = label_loss(module(xin), y)
    sgd.zero_grad(set_to_none=True)
    loss.backward()
    sgd.step()


@torch.no_grad()
def _torch_forward(module: torch.nn.Module, x: torch.Tensor) -> None:
    module(x)


def bench_model(name: str, batches: list[int], repeats: int, work: Path) -> list[dict[str, object]]:
    torch.manual_seed(0)
    part = partition(FACTORIES[name](), list(DEFAULT_CUTS[name]), torch.zeros(2, 1, 8, 8))
    opt = OptimizerSpec(name="sgd", lr=0.01)
    source = SourceSpec(file_name=f"{name}.pt", sha256="0" * 64, kind="state_dict")
    bundle = export_onnx(write_bundle(part, work / name, source=source, optimizer=opt))
    rows: list[dict[str, object]] = []
    rng = np.random.default_rng(0)
    for seg_name in ("A", "C"):
        spec = bundle.manifest.segment(seg_name)
        seg = OrtSegment.from_bundle(bundle, seg_name)
        module = bundle.torch_segment(seg_name).train()
        sgd = torch.optim.SGD(module.parameters(), lr=opt.lr)
        for n in batches:
            x = rng.standard_normal((n, *spec.input.sample_shape)).astype(np.float32)
            if seg_name == "A":
                g = (rng.standard_normal((n, *spec.output.sample_shape)) * 1e-3).astype(np.float32)
                row = {
                    "ort_step_ms": median_ms(partial(seg.train_with_gradient, x, g), repeats),
                    "torch_step_ms": median_ms(
                        partial(_torch_aux_step, module, sgd, torch.from_numpy(x), torch.from_numpy(g)), repeats
                    ),
                    "ort_forward_ms": median_ms(partial(seg.forward, x), repeats),
                    "torch_forward_ms": median_ms(partial(_torch_forward, module, torch.from_numpy(x)), repeats),
                }
            else:
                y = rng.integers(0, 10, size=n)
                row = {
                    "ort_step_ms": median_ms(partial(seg.train_with_labels, x, y), repeats),
                    "torch_step_ms": median_ms(
                        partial(_torch_label_step, module, sgd, torch.from_numpy(x), torch.from_numpy(y)), repeats
                    ),
                }
            rows.append({"model": name, "segment": seg_name, "batch": n, "params": spec.parameters, **row})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(FACTORIES))
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", type=Path, help="also write the rows and the machine description here")
    p.add_argument("--smoke", action="store_true", help="seconds: the MLP, batch 8, 2 repeats (checks the script runs)")
    args = p.parse_args()
    if args.smoke:
        args.models, args.batches, args.repeats = ["mlp"], [8], 2
    info = machine(onnxruntime=onnxruntime.__version__, threads=str(torch.get_num_threads()))
    print(f"# {info}")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args.batches, args.repeats, Path(tmp))
    print(
        "| model | segment | batch | ORT train step (ms) | torch fwd+bwd+step (ms) | ratio | ORT forward (ms) | torch forward (ms) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = float(r["ort_step_ms"]) / float(r["torch_step_ms"])  # type: ignore[arg-type]
        fwd = f"{r['ort_forward_ms']:.2f} | {r['torch_forward_ms']:.2f}" if "ort_forward_ms" in r else "- | -"
        print(
            f"| {r['model']} | {r['segment']} | {r['batch']} | {r['ort_step_ms']:.2f} | {r['torch_step_ms']:.2f} "
            f"| {ratio:.2f} | {fwd} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
