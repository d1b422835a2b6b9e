"""``splitexport simulate``: split training of a bundle in process, beside a monolithic run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _trainer
from .._bundle import Bundle
from .._errors import SplitExportError
from .._manifest import OptimizerSpec, SegmentSpec
from .._torch_segment import TorchSegment
from .._trainer import History, MonolithicModel, SegmentRunner, SplitModel, compose, fit
from ..defence import defence_for
from .data import Dataset
from .datafiles import resolve_data
from .plots import plot_histories

RunnerFactory = Callable[[Bundle, SegmentSpec, OptimizerSpec, int], SegmentRunner]
"""(bundle, segment, optimizer, seed) -> runner; the seed draws the activation noise of a defended A."""


def _torch_runner(bundle: Bundle, spec: SegmentSpec, optimizer: OptimizerSpec, seed: int) -> SegmentRunner:
    return TorchSegment(bundle.torch_segment(spec.name), optimizer, loss=bundle.manifest.loss.kind,
                        input_grad=spec.index > 0, defence=defence_for(bundle.manifest.defence, spec.index, seed))


def _onnx_runner(bundle: Bundle, spec: SegmentSpec, optimizer: OptimizerSpec, seed: int) -> SegmentRunner:
    from device_runtime import OrtRunner  # the ONNX Runtime device runtime (optional extra)

    return OrtRunner.from_bundle(bundle, spec.name, optimizer=optimizer, seed=seed)  # type: ignore[no-any-return]


DEVICE_RUNTIMES: dict[str, RunnerFactory] = {"torch": _torch_runner, "onnx": _onnx_runner}
"""How device segments run in a simulation; server segments always run in torch."""


@dataclass
class SimulationResult:
    histories: list[History]
    max_weight_difference: float
    """Largest |split (torch) - monolithic| over every parameter and buffer."""
    where: str
    plot: Path | None
    metrics: Path | None
    differences: dict[str, tuple[float, str]] = field(default_factory=dict)
    """Per split run (``split (torch)``, ``split (onnx devices)``): its own largest |split - monolithic|
    and where, over the parameters and BatchNorm statistics the run holds (device runtimes keep no
    ``num_batches_tracked``)."""


def simulate(
    bundle: Bundle,
    *,
    dataset: str | Dataset = "digits",
    data: str | Path | None = None,
    target: str | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    optimizer: OptimizerSpec | None = None,
    device_runtime: str = "torch",
    out_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> SimulationResult:
    """Train the bundle's segments split (device runtime for A/C, torch for B) and monolithically.

    A defence recorded in the manifest applies to A in every run, the monolithic one included (the same
    NoPeek term, the same noise drawn from ``seed``).

    ``data``: a file or image folder (``--data``; ``target``: the CSV label column), read and
    preprocessed as the manifest records (else as fitted on it); otherwise ``dataset``.
    """
    if device_runtime not in DEVICE_RUNTIMES:
        raise SplitExportError(f"unknown device runtime {device_runtime!r}; choose from {sorted(DEVICE_RUNTIMES)}")
    if epochs < 1 or batch_size < 1:
        raise SplitExportError("--epochs and --batch-size must be at least 1")
    manifest = bundle.manifest
    opt = optimizer or manifest.optimizer
    loss = manifest.loss.kind
    train_data = resolve_data(dataset, manifest, data=data, target=target)
    torch.manual_seed(seed)
    StateFn = Callable[[], dict[str, torch.Tensor]]
    runs: list[tuple[str, Callable[[], tuple[object, StateFn]]]] = []

    def split_run(runtime: str) -> tuple[object, StateFn]:
        runners: list[SegmentRunner] = []
        for spec in manifest.segments:
            make = DEVICE_RUNTIMES[runtime] if spec.role == "device" else _torch_runner
            runners.append(make(bundle, spec, opt, seed))

        def state() -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for r in runners:  # torch segments' modules; device runtimes' own parameters and statistics
                out.update(_trainer.named_state([r.module]) if isinstance(r, TorchSegment) else r.state_dict())  # type: ignore[attr-defined]
            return out

        return SplitModel(runners), state

    def mono_run() -> tuple[object, StateFn]:
        seq = compose([bundle.torch_segment(s.name) for s in manifest.segments])
        return MonolithicModel(seq, opt, loss, defence_for(manifest.defence, 0, seed)), lambda: _trainer.named_state(list(seq))

    runs.append(("split (torch)", lambda: split_run("torch")))
    if device_runtime != "torch":
        runs.append((f"split ({device_runtime} devices)", lambda: split_run(device_runtime)))
    runs.append(("monolithic", mono_run))

    histories: list[History] = []
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, build in runs:
        model, state_of = build()

        def report(m: object, run: str = name) -> None:
            if log is not None:
                e = m  # EpochMetrics
                log(
                    f"{run:>24} epoch {e.epoch}: train loss {e.train_loss:.4f}  "  # type: ignore[attr-defined]
                    f"test loss {e.test_loss:.4f}"  # type: ignore[attr-defined]
                    + ("" if loss == "mse" else f"  test acc {e.test_accuracy:.4f}")  # type: ignore[attr-defined]
                )

        histories.append(
            fit(model, train_data, name=name, epochs=epochs, batch_size=batch_size, seed=seed, loss=loss,  # type: ignore[arg-type]
                progress=progress, on_epoch=report)
        )
        states[name] = state_of()
    mono = states["monolithic"]
    differences: dict[str, tuple[float, str]] = {}
    for name, state in states.items():
        if name != "monolithic":
            differences[name] = _trainer.max_abs_difference(state, {k: mono[k] for k in state})
            if log is not None:
                d, w = differences[name]
                detail = f"{w} is NaN/Inf in a run" if math.isinf(d) else w
                log(f"max |{name} - monolithic| over its parameters and BN statistics: {d:.3e} ({detail})")
    diff, where = differences["split (torch)"]
    plot = metrics = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        title = f"{manifest.source.file_name} cut at {', '.join(manifest.cuts)} on {train_data.name}"
        plot = plot_histories(histories, out / "simulate.png", title=title)
        metrics = out / "metrics.json"
        metrics.write_text(
            json.dumps(
                {"bundle": str(bundle.path), "dataset": train_data.name, "epochs": epochs, "batch_size": batch_size,
                 "seed": seed, "optimizer": opt.model_dump(mode="json"), "device_runtime": device_runtime,
                 "max_weight_difference": diff, "where": where,
                 "weight_differences": {k: {"max": d, "where": w} for k, (d, w) in differences.items()},
                 "runs": [h.to_dict() for h in histories]},
                indent=2,
            )
        )
        if log is not None:
            log(f"wrote {plot} and {metrics}")
    return SimulationResult(histories, diff, where, plot, metrics, differences)
