"""How float16 transport treats the tensors of a training step: subnormal gradients, rounding, conversion time.

    python benchmarks/fp16_subnormals.py [--models resnet_cnn mlp] [--batches 32 128] [--steps 55] [--smoke]

For each example model (default cuts, A | B | C, SGD lr 0.01 as in ``bench_protocol.py``) and batch
size, the split model trains in torch for ``--steps`` steps on shuffled digits batches; the four tensors
that cross the wire in the last step (A's activation, B's output, dL/d(B output), dL/d(B input)) are
cast to float16 as ``RemoteSegment(fp16=True)`` and the server do (numpy ``astype``). Per tensor:
median |value| of the non-zero values, the share of them that are float16 subnormals (|v| < 2**-14),
the share that become 0, the median relative rounding error, and the median time of the float32 ->
float16 conversion next to that of the same tensor scaled into the normal range (x 2**16 for gradients).
Source of the float16 figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine

from splitexport import OptimizerSpec, TorchSegment, load_dataset, partition
from splitexport.models import DEFAULT_CUTS, FACTORIES
from splitexport.simulation.data import batch_indices

SMALLEST_NORMAL = 2.0**-14


def step_tensors(name: str, batch: int, steps: int) -> dict[str, np.ndarray]:
    """Train ``steps`` steps; the last step's four wire tensors."""
    torch.manual_seed(0)
    part = partition(FACTORIES[name](), list(DEFAULT_CUTS[name]), torch.zeros(2, 1, 8, 8))
    opt = OptimizerSpec(name="sgd", lr=0.01)
    a, b, c = (TorchSegment(s.module, opt, input_grad=i > 0) for i, s in enumerate(part.segments))
    data = load_dataset("digits")
    order = [idx for e in range(steps) for idx in batch_indices(len(data.x_train), batch, seed=0, epoch=e)
             if len(idx) == batch][:steps]
    out: dict[str, np.ndarray] = {}
    for idx in order:
        act = a.forward(data.x_train[idx])
        h = b.forward(act)
        _, g_h, _ = c.train_with_labels(h, data.y_train[idx])
        assert g_h is not None
        g_act = b.train_with_gradient(g_h)
        assert g_act is not None
        a.train_with_gradient(g_act)
        out = {"activation": act, "B output": h, "dL/d(B output)": g_h, "dL/d(B input)": g_act}  # type: ignore[dict-item]
    return {k: v.detach().contiguous().numpy() for k, v in out.items()}  # type: ignore[attr-defined]


def median_ms(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def describe(x: np.ndarray, repeats: int) -> dict[str, float]:
    nz = x[x != 0]
    mag = np.abs(nz).astype(np.float64)
    half = nz.astype(np.float16).astype(np.float64)
    rel = np.abs(half - nz) / mag
    normal = (x * np.float32(2.0**16)) if np.median(mag) < SMALLEST_NORMAL else x
    return {
        "median_abs": float(np.median(mag)),
        "subnormal": float(np.mean(mag < SMALLEST_NORMAL)),
        "to_zero": float(np.mean(half == 0)),
        "median_rel_err": float(np.median(rel)),
        "cast_ms": median_ms(lambda: x.astype(np.float16), repeats),
        "cast_normal_ms": median_ms(lambda: normal.astype(np.float16), repeats),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet_cnn", "mlp"], choices=sorted(FACTORIES))
    p.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    p.add_argument("--steps", type=int, default=55, help="training steps before the measured one")
    p.add_argument("--repeats", type=int, default=20, help="timed conversions per tensor (median)")
    p.add_argument("--smoke", action="store_true", help="seconds: the ResNet, batch 32, 3 steps (checks the script runs)")
    args = p.parse_args()
    if args.smoke:
        args.models, args.batches, args.steps, args.repeats = ["resnet_cnn"], [32], 3, 3
    torch.set_num_threads(1)
    print(f"# {machine(numpy=np.__version__)}")
    print("| model | batch | tensor | median \\|v\\| | fp16 subnormal | become 0 | median rel. error | "
          "cast ms | cast ms, normal range |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        for batch in args.batches:
            for tensor, x in step_tensors(name, batch, args.steps).items():
                d = describe(x, args.repeats)
                print(f"| {name} | {batch} | {tensor} | {d['median_abs']:.1e} | {100 * d['subnormal']:.0f} % | "
                      f"{100 * d['to_zero']:.2f} % | {d['median_rel_err']:.1e} | {d['cast_ms']:.2f} | "
                      f"{d['cast_normal_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
