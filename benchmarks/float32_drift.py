"""Float32 chaos of the BatchNorm ResNet: two torch runs that differ only in the thread count.

    python benchmarks/float32_drift.py [--steps 43] [--seeds 0 1 2] [--lrs 0.05 0.005] [--smoke]

Two copies of the monolithic ``resnet_cnn`` (seed 0 weights) train on the same shuffled digits batches
(batch 32, ``simulate``'s order for the given epoch seed); one steps with ``torch.set_num_threads(1)``,
the other with 2. Printed per configuration (SGD at each learning rate and epoch seed, SGD with Gaussian
noise on the images, AdamW): max |dw| over every parameter and BatchNorm statistic after steps
1-5, 10, 15 and the last, and the first step above 1e-5.

Then, for the first configuration, the step where the drift first grows more than 100x: how far the
weights entering it already differ, how far that step's gradients differ when both thread counts start
from *identical* weights, and, per ReLU, the smallest |input| in that batch and how many inputs lie
within 1e-5 of zero (a 1e-7 nudge can flip those gates). Source of docs/onnx.md's "float32-chaotic"
paragraphs (the ORT-specific figures there come from tests/device_runtime/test_ort_equivalence.py).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine

from splitexport import MonolithicModel, OptimizerSpec, load_dataset, max_abs_difference
from splitexport.models import resnet_cnn
from splitexport.simulation.data import Dataset, batch_indices

REPORT_STEPS = (1, 2, 3, 4, 5, 10, 15)


def batches(data: Dataset, steps: int, seed: int, noise: float) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    done, epoch = 0, 0
    while True:
        for idx in batch_indices(len(data.x_train), 32, seed=seed, epoch=epoch):
            x = data.x_train[idx]
            yield (x + noise * torch.randn(x.shape, generator=gen) if noise else x), data.y_train[idx]
            done += 1
            if done == steps:
                return
        epoch += 1


def drift(data: Dataset, opt: OptimizerSpec, steps: int, seed: int, noise: float) -> tuple[list[float], list[MonolithicModel]]:
    """max |dw| after every step between the 1-thread and the 2-thread run; the two runs at the end."""
    torch.manual_seed(0)
    model = resnet_cnn()
    runs = [MonolithicModel(copy.deepcopy(model), opt) for _ in range(2)]
    out = []
    for x, y in batches(data, steps, seed, noise):
        for n, run in zip((1, 2), runs, strict=True):
            torch.set_num_threads(n)
            run.step(x, y)
        out.append(max_abs_difference(runs[0].module.state_dict(), runs[1].module.state_dict())[0])
    return out, runs


def gradients(module: nn.Module, x: torch.Tensor, y: torch.Tensor, threads: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    m = copy.deepcopy(module)
    m.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    return {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None}


def gate_report(data: Dataset, opt: OptimizerSpec, steps: int, seed: int, curve: list[float]) -> None:
    jumps = [i for i in range(1, len(curve)) if curve[i - 1] > 0 and curve[i] > 100 * curve[i - 1]]
    if not jumps:
        print("no step where the drift grows more than 100x")
        return
    step = jumps[0]  # 0-based: the step taken from the weights after `step` steps
    _, runs = drift(data, opt, step, seed, 0.0)
    x, y = list(batches(data, step + 1, seed, 0.0))[step]
    g1 = gradients(runs[0].module, x, y, 1)
    g2 = gradients(runs[0].module, x, y, 2)
    dg = max(float((g1[k] - g2[k]).abs().max()) for k in g1)
    print(f"\nfirst jump at step {step + 1}: the weights entering it differ by {curve[step - 1]:.1e}, after it by "
          f"{curve[step]:.1e}; from identical weights its gradients differ by {dg:.1e} (threads 1 vs 2)")
    print("| ReLU | smallest \\|input\\| in the batch | inputs within 1e-5 of 0 | inputs |")
    print("|---|---:|---:|---:|")
    rows: list[tuple[str, float, int, int]] = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out, name=name: rows.append(
        (name, float(inp[0].abs().min()), int((inp[0].abs() < 1e-5).sum()), inp[0].numel())))
        for name, mod in runs[0].module.named_modules() if isinstance(mod, nn.ReLU)]
    with torch.no_grad():
        runs[0].module(x)
    for h in hooks:
        h.remove()
    for name, low, near, total in rows:
        print(f"| {name} | {low:.1e} | {near} | {total} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=43)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.005])
    p.add_argument("--noise", type=float, default=0.1, help="std of the Gaussian noise of the noisy-images run")
    p.add_argument("--smoke", action="store_true", help="seconds: 3 steps, seed 0, lr 0.05 (checks the script runs)")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.seeds, args.lrs = 3, [0], [0.05]
    threads = torch.get_num_threads()
    print(f"# {machine()}")
    data = load_dataset("digits")
    configs = [(f"SGD lr {lr}, epoch seed {s}", OptimizerSpec(name="sgd", lr=lr), s, 0.0)
               for lr in args.lrs for s in args.seeds]
    configs += [(f"SGD lr {args.lrs[0]}, images + N(0, {args.noise}^2)", OptimizerSpec(name="sgd", lr=args.lrs[0]),
                 args.seeds[0], args.noise),
                ("AdamW lr 1e-3 wd 1e-2", OptimizerSpec(name="adamw", lr=1e-3, weight_decay=1e-2), args.seeds[0], 0.0)]
    shown = [s for s in REPORT_STEPS if s < args.steps] + [args.steps]
    print("\nmax |dw|, monolithic ResNet, torch threads 1 vs 2, batch 32 shuffled epochs, after step:")
    print("| run | " + " | ".join(str(s) for s in shown) + " | first > 1e-5 |")
    print("|---|" + "---:|" * (len(shown) + 1))
    curves = {}
    try:
        for label, opt, seed, noise in configs:
            curve, _ = drift(data, opt, args.steps, seed, noise)
            curves[label] = curve
            first = next((i + 1 for i, d in enumerate(curve) if d > 1e-5), None)
            print(f"| {label} | " + " | ".join(f"{curve[s - 1]:.1e}" for s in shown) + f" | {first or '-'} |", flush=True)
        label, opt, seed, _ = configs[0]
        gate_report(data, opt, args.steps, seed, curves[label])
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
