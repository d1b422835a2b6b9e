"""``splitexport plan``: every candidate cut (or pair of cuts) with its measured and predicted cost.

For each candidate the device segments are exported to ONNX Runtime training artifacts and one training
step is timed here; the server segment is timed in torch. A device profile scales the device time from
this machine to a phone class (:data:`DEVICE_PROFILES`, or ``--device-flops``) by the ratio of the two
machines' fp32 matrix-multiply rates. The link adds, per step, one round trip per request and the bytes
both ways over the bandwidth; the bytes are those of the real request and response bodies
(:func:`splitexport.protocol.encode`), in float32 and float16. The model (docs/plan.md):

    step = device + server + requests * rtt + (bytes_up + bytes_down) * 8 / bandwidth
    epoch = ceil(train samples / batch) * step

Not included: HTTP and (de)serialisation overhead (a few ms per request on loopback) and any overlap.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import protocol
from ._errors import PartitionError, SplitExportError
from ._manifest import OptimizerSpec
from ._partition import Segment, _TracedModel, list_cut_points, partition
from ._torch_segment import TorchSegment

DeviceOptimizerName = Literal["sgd", "adamw"]


@dataclass(frozen=True)
class DeviceProfile:
    """A device class: its assumed sustained single-thread fp32 matrix-multiply rate."""

    name: str
    flops_per_s: float | None
    """``None``: this machine (no scaling)."""
    note: str


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("host", None, "this machine, unscaled (what a loopback run measures)"),
        DeviceProfile("phone-low", 2e9, "low-end phone core (Cortex-A53 class), assumed 2 GFLOP/s"),
        DeviceProfile("phone-mid", 8e9, "mid-range phone core (Cortex-A76 class), assumed 8 GFLOP/s"),
        DeviceProfile("phone-high", 25e9, "flagship phone core (Cortex-X class), assumed 25 GFLOP/s"),
    )
}
"""Assumed rates, orders of magnitude, not measurements: pass ``--device-flops`` for a measured device."""

_UNITS_BITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_UNITS_S = {"ms": 1e-3, "s": 1.0, "us": 1e-6}


def bandwidth(text: str) -> float:
    """``20mbit``, ``500kbit``, ``1gbit`` (also ``mbps``; ``/s`` optional) -> bits per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]+)(?:/s)?\s*", text.lower())
    if not m or m.group(2) not in _UNITS_BITS:
        raise argparse.ArgumentTypeError(f"expected a bandwidth like 20mbit, 500kbit or 1gbit, got {text!r}")
    value = float(m.group(1)) * _UNITS_BITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"the bandwidth must be positive, got {text!r}")
    return value


def duration(text: str) -> float:
    """``60ms``, ``0.06s``, ``500us`` -> seconds (0 allowed: no latency)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(ms|s|us)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a time like 60ms or 0.06s, got {text!r}")
    value = float(m.group(1)) * _UNITS_S[m.group(2)]
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite time, got {text!r}")
    return value


@dataclass(frozen=True)
class Link:
    """The network between device and server."""

    bandwidth_bps: float
    rtt_s: float

    def time(self, requests: int, nbytes: int) -> float:
        """Seconds the link adds to a step: a round trip per request and the bytes both ways."""
        return requests * self.rtt_s + nbytes * 8 / self.bandwidth_bps


@dataclass
class Candidate:
    """One single cut or pair of cuts, with costs per training step of ``batch`` samples."""

    cuts: tuple[str, ...]
    device_flops: int
    """Forward FLOPs per sample of the device segments (as ``inspect``)."""
    server_flops: int
    device_params: int
    device_time_host_s: float
    """One device training step measured in ONNX Runtime on this machine."""
    device_time_s: float
    """... scaled to the device profile."""
    server_time_s: float
    requests: int
    bytes_up: dict[str, int]
    """float32 / float16 -> request body bytes per step."""
    bytes_down: dict[str, int]
    device_memory: dict[str, int]
    """params, gradients, optimizer_state, activations, total: bytes a device step holds."""
    leakage: dict[str, float | None] | None = None
    """``--attack``: psnr_db, ssim (images), label_auc (single split), token_accuracy and token_baseline (token
    inputs); see :mod:`splitexport._privacy`."""
    step_time_s: dict[str, float] = field(default_factory=dict)
    epoch_time_s: dict[str, float] = field(default_factory=dict)
    pareto: bool = False

    @property
    def label(self) -> str:
        return "+".join(self.cuts)


@dataclass
class Plan:
    candidates: list[Candidate]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "candidates": [{**asdict(c), "label": c.label} for c in self.candidates]}


def matmul_rate(threads: int, size: int = 256, reps: int = 20) -> float:
    """This machine's fp32 matrix-multiply FLOP/s with ``threads`` torch threads (median of ``reps``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        t = _median_time(lambda: torch.mm(a, b), reps)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / t


def _median_time(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _DeviceTimer:
    """Exports device segments to ONNX Runtime (once per cut) and times their training steps."""

    def __init__(self, workdir: Path, optimizer: DeviceOptimizerName, lr: float, loss: Any, batch: int,
                 threads: int, reps: int) -> None:
        from .export._onnx import DeviceOptimizer

        self.workdir, self.batch, self.threads, self.reps, self.loss = workdir, batch, threads, reps, loss
        self.optimizer = DeviceOptimizer(optimizer, lr)
        self._cache: dict[tuple[str, bool], float] = {}

    def time(self, key: str, seg: Segment, is_last: bool, labels: torch.Tensor | None) -> float:
        """Seconds of one step: forward + train on a gradient (before the server), or train on labels (last)."""
        if (key, is_last) in self._cache:
            return self._cache[(key, is_last)]
        from device_runtime import OrtSegment

        from .export._onnx import example_input, export_segment_onnx

        out = self.workdir / f"{key}-{'last' if is_last else 'first'}"
        export_segment_onnx(copy.deepcopy(seg.module), seg.input_shape[1:], out, is_last=is_last,
                            optimizer=self.optimizer, loss=self.loss, name=key, check=False, dtype=seg.input_dtype)
        ort = OrtSegment.from_directory(out, learning_rate=self.optimizer.lr, threads=self.threads, seed=0)
        x = example_input(seg.input_shape[1:], self.batch, seg.input_dtype).numpy()
        if is_last:
            assert labels is not None
            y = labels.numpy()
            t = _median_time(lambda: ort.train_with_labels(x, y), self.reps)
        else:
            g = np.random.default_rng(0).standard_normal((self.batch, *seg.output_shape[1:])).astype(np.float32)
            g *= 1e-3

            def step() -> None:
                ort.forward(x)
                ort.train_with_gradient(x, g)
            t = _median_time(step, self.reps)
        self._cache[(key, is_last)] = t
        return t


def _server_time(seg: Segment, optimizer: OptimizerSpec, loss: Any, batch: int, labels: torch.Tensor | None,
                 threads: int, reps: int) -> float:
    """Seconds of one server step in torch: train on labels (single split), or forward + backward (middle)."""
    runner = TorchSegment(copy.deepcopy(seg.module), optimizer, loss=loss, input_grad=True)
    x = torch.randn(batch, *seg.input_shape[1:], generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if labels is not None:
            return _median_time(lambda: runner.train_with_labels(x, labels), reps)
        g = torch.randn(batch, *seg.output_shape[1:]) * 1e-3

        def step() -> None:
            runner.forward(x)
            runner.train_with_gradient(g)
        return _median_time(step, reps)
    finally:
        torch.set_num_threads(before)


def _body_bytes(shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, int]:
    """Bytes of a protocol body holding zero tensors of these shapes and dtypes, in float32 and float16."""
    arrays = {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in shapes.items()}
    return {name: len(protocol.encode(arrays, dt)) for name, dt in (("float32", np.float32), ("float16", np.float16))}


def _activation_bytes(traced: _TracedModel, lo: int, hi: int, batch_in_trace: int) -> int:
    """Bytes per sample of every compute node's output in ``[lo, hi]`` (kept for backward: an upper bound)."""
    total = 0
    for n in traced.compute[lo: hi + 1]:
        tm = traced.tensor_meta.get(n)
        if tm is not None and hasattr(tm, "shape") and hasattr(tm, "dtype"):
            total += torch.Size(tm.shape).numel() // batch_in_trace * torch.empty((), dtype=tm.dtype).element_size()
    return total


def _label_shape(loss: str, out_shape: tuple[int, ...], batch: int) -> tuple[tuple[int, ...], Any]:
    return ((batch,), np.int64) if loss == "cross_entropy" else ((batch, *out_shape[1:]), np.float32)


def plan(
    model: nn.Module,
    example: torch.Tensor,
    *,
    double: bool = False,
    batch: int = 32,
    train_samples: int,
    link: Link,
    profile: DeviceProfile,
    optimizer: DeviceOptimizerName = "sgd",
    loss: Literal["cross_entropy", "mse"] = "cross_entropy",
    threads: int = 1,
    reps: int = 5,
    attack: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Plan:
    """Measure and predict every single cut (or, with ``double``, every valid pair of cuts) of ``model``.

    ``attack``: (inputs, labels) to measure each candidate's leakage on (:func:`splitexport._privacy.measure`).
    """
    points = list_cut_points(model, example)
    if not points:
        raise PartitionError("the model has no valid cut point")
    traced = _TracedModel(model, example)
    trace_batch = max(int(example.shape[0]), 1)
    by_name = {p.name: p for p in points}
    pos = {p.name: traced.position(p.name) for p in points}
    last = len(traced.compute) - 1
    server_opt = OptimizerSpec(name="adamw" if optimizer == "adamw" else "sgd", lr=0.05)
    host_rate = matmul_rate(threads)
    scale = 1.0 if profile.flops_per_s is None else host_rate / profile.flops_per_s
    out_shape = tuple(int(s) for s in traced.tensor_meta[traced.compute[-1]].shape)  # type: ignore[union-attr]
    n_out = out_shape[1] if len(out_shape) > 1 else 1
    labels = (torch.arange(batch) % n_out).long() if loss == "cross_entropy" else torch.zeros(batch, *out_shape[1:])
    input_bytes = (example.numel() // trace_batch) * example.element_size()
    state_per_param = {"sgd": 0, "adamw": 2}[optimizer]

    combos: list[tuple[str, ...]]
    if double:
        combos = [(a.name, b.name) for i, a in enumerate(points) for b in points[i + 1:] if pos[b.name] > pos[a.name]]
    else:
        combos = [(p.name,) for p in points]
    candidates: list[Candidate] = []
    skipped: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="splitexport-plan-") as tmp:
        timer = _DeviceTimer(Path(tmp), optimizer, 0.05, loss, batch, threads, reps)
        for cuts in combos:
            try:
                part = partition(model, list(cuts), example)
            except PartitionError:
                continue  # e.g. a module used on both sides of the pair
            if log:
                log(f"timing cut {'+'.join(cuts)}")
            first, *rest = part.segments
            frozen = [f"{s.name} ({s.role})" for s in part.segments if s.num_parameters == 0]
            if frozen:
                skipped.append({"cuts": list(cuts), "reason": f"segment {', '.join(frozen)} has no parameters "
                                "(nothing to train there)"})
                continue
            c1 = by_name[cuts[0]]
            dev_t = timer.time(cuts[0], first, False, None)
            act1 = (batch, *c1.output_shape[1:])
            act_mem = batch * (input_bytes + _activation_bytes(traced, 0, pos[cuts[0]], trace_batch))
            if double:
                mid, tail = rest
                c2 = by_name[cuts[1]]
                dev_t += timer.time(cuts[1], tail, True, labels)
                srv_t = _server_time(mid, server_opt, loss, batch, None, threads, reps)
                act2 = (batch, *c2.output_shape[1:])
                act_mem += batch * _activation_bytes(traced, pos[cuts[1]] + 1, last, trace_batch)
                up = [_body_bytes({"activation": (act1, np.float32)}), _body_bytes({"grad": (act2, np.float32)})]
                down = [_body_bytes({"output": (act2, np.float32)}), _body_bytes({"grad": (act1, np.float32)})]
                params = c1.params_before + c2.params_after
                dflops = c1.flops_before + c2.flops_after
                requests = 2
            else:
                srv_t = _server_time(rest[0], server_opt, loss, batch, labels, threads, reps)
                up = [_body_bytes({"activation": (act1, np.float32), "labels": _label_shape(loss, out_shape, batch)})]
                down = [_body_bytes({"grad": (act1, np.float32), "loss": ((1,), np.float32),
                                     "output": ((batch, *out_shape[1:]), np.float32)})]
                params, dflops, requests = c1.params_before, c1.flops_before, 1
            bytes_up = {k: sum(b[k] for b in up) for k in ("float32", "float16")}
            bytes_down = {k: sum(b[k] for b in down) for k in ("float32", "float16")}
            mem = {"params": 4 * params, "gradients": 4 * params, "optimizer_state": 4 * params * state_per_param,
                   "activations": act_mem}
            mem["total"] = sum(mem.values())
            cand = Candidate(
                cuts=cuts, device_flops=dflops, server_flops=sum(traced.flops) // trace_batch - dflops,
                device_params=params, device_time_host_s=dev_t, device_time_s=dev_t * scale, server_time_s=srv_t,
                requests=requests, bytes_up=bytes_up, bytes_down=bytes_down, device_memory=mem,
            )
            if attack is not None:
                from ._privacy import measure

                found = measure(model, cuts, example, attack[0], attack[1])
                cand.leakage = {"psnr_db": found.psnr_db, "ssim": found.ssim, "label_auc": found.label_auc,
                                "token_accuracy": found.token_accuracy, "token_baseline": found.token_baseline}
            steps = math.ceil(train_samples / batch)
            for k in ("float32", "float16"):
                t = cand.device_time_s + srv_t + link.time(requests, bytes_up[k] + bytes_down[k])
                cand.step_time_s[k] = t
                cand.epoch_time_s[k] = t * steps
            candidates.append(cand)
    if not candidates:
        raise PartitionError("no valid pair of cuts" if double else "no valid cut")
    mark_pareto(candidates)
    settings = {
        "split": "double" if double else "single", "batch_size": batch, "train_samples": train_samples,
        "bandwidth_bps": link.bandwidth_bps, "rtt_s": link.rtt_s, "device_profile": profile.name,
        "device_flops_per_s": profile.flops_per_s, "host_matmul_flops_per_s": host_rate, "device_time_scale": scale,
        "optimizer": optimizer, "threads": threads, "reps": reps, "skipped": skipped,
        "attack_samples": None if attack is None else int(attack[0].shape[0]),
    }
    return Plan(candidates, settings)


def mark_pareto(candidates: Sequence[Candidate]) -> None:
    """Pareto-best on (float32 step time, device memory): no other candidate is at least as good on both
    and better on one."""
    for c in candidates:
        t, m = c.step_time_s["float32"], c.device_memory["total"]
        c.pareto = not any(
            (o.step_time_s["float32"] <= t and o.device_memory["total"] <= m)
            and (o.step_time_s["float32"] < t or o.device_memory["total"] < m)
            for o in candidates
        )


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def _kb(b: int) -> str:
    return f"{b / 1e3:.1f}"


def format_table(p: Plan) -> str:
    """The terminal table: one row per candidate, ``*`` on the Pareto-best."""
    s = p.settings
    w = max([22, *(len(c.label) for c in p.candidates)])
    leak = p.candidates[0].leakage
    tokens = leak is not None and leak.get("token_accuracy") is not None
    head = (f"{'cut':<{w}} {'dev FLOPs':>10} {'dev ms':>7} {'srv ms':>7} {'up kB':>8} {'down kB':>8} "
            f"{'dev mem kB':>10} {'step ms':>8} {'fp16 ms':>8} {'epoch s':>8}  pareto"
            + ("" if leak is None else f" {'tokenAcc':>8} {'majority':>8} {'labelAUC':>8}" if tokens
               else f" {'PSNR dB':>7} {'SSIM':>5} {'labelAUC':>8}"))
    lines = [
        (f"{s['split']} split, batch {s['batch_size']}, {s['train_samples']} training samples; link "
         f"{s['bandwidth_bps'] / 1e6:g} Mbit/s, RTT {s['rtt_s'] * 1e3:g} ms; device {s['device_profile']} "
         f"(device time = measured ONNX Runtime time x {s['device_time_scale']:.3g})"),
        head, "-" * len(head),
    ]
    for c in p.candidates:
        lines.append(
            f"{c.label:<{w}} {c.device_flops:>10} {_ms(c.device_time_s):>7} {_ms(c.server_time_s):>7} "
            f"{_kb(c.bytes_up['float32']):>8} {_kb(c.bytes_down['float32']):>8} {_kb(c.device_memory['total']):>10} "
            f"{_ms(c.step_time_s['float32']):>8} {_ms(c.step_time_s['float16']):>8} "
            f"{c.epoch_time_s['float32']:>8.2f}  {'*' if c.pareto else '':<6}" + _leak(c.leakage))
    for sk in s["skipped"]:
        lines.append(f"{'+'.join(sk['cuts']):<{w}} skipped: {sk['reason']}")
    lines.append("(up/down: float32 bytes per step; step = device + server + requests x RTT + bytes x 8 / bandwidth; "
                 "* = Pareto-best on step time and device memory)")
    return "\n".join(line.rstrip() for line in lines)


def _leak(leak: dict[str, float | None] | None) -> str:
    if leak is None:
        return ""

    def f(v: float | None, fmt: str, width: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"
    if leak.get("token_accuracy") is not None:
        return (f" {f(leak['token_accuracy'], '.3f', 8)} {f(leak['token_baseline'], '.3f', 8)}"
                f" {f(leak['label_auc'], '.3f', 8)}")
    return f" {f(leak['psnr_db'], '.1f', 7)} {f(leak['ssim'], '.2f', 5)} {f(leak['label_auc'], '.3f', 8)}"


def plot_plan(p: Plan, path: str | Path) -> Path:
    """Device memory vs predicted step time (float32 and float16), the Pareto-best highlighted."""
    from .simulation.plots import pyplot

    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, marker in (("float32", "o"), ("float16", "^")):
        xs = [c.device_memory["total"] / 1e3 for c in p.candidates]
        ys = [c.step_time_s[k] * 1e3 for c in p.candidates]
        colors = ["tab:red" if c.pareto else "tab:blue" for c in p.candidates]
        ax.scatter(xs, ys, marker=marker, c=colors, label=f"{k} transport", alpha=0.8)
    for c in p.candidates if len(p.candidates) <= 8 else [c for c in p.candidates if c.pareto]:
        ax.annotate(c.label, (c.device_memory["total"] / 1e3, c.step_time_s["float32"] * 1e3), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("device training memory (kB)")
    ax.set_ylabel("predicted step time (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s = p.settings
    ax.set_title(f"{s['split']} split, {s['device_profile']}, {s['bandwidth_bps'] / 1e6:g} Mbit/s, "
                 f"RTT {s['rtt_s'] * 1e3:g} ms (red: Pareto-best, labelled)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def resolve_profile(name: str | None, device_flops: float | None) -> DeviceProfile:
    if device_flops is not None:
        if name is not None:
            raise SplitExportError("give --device-profile or --device-flops, not both")
        return DeviceProfile("custom", device_flops, f"--device-flops {device_flops:g}")
    return DEVICE_PROFILES[name or "host"]

