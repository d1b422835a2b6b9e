"""ORT device segments (A, C) against the real server (B) over loopback HTTP, exact vs in process.

The bundle is exported with ``splitexport export --format onnx`` (plain SGD, as the bundle); the
HTTP run and the in-process run (the same ORT artifacts for A and C, ``TorchSegment`` for B) train
on the same shuffled epochs of digits and must end with the same weights. ``pytest -s`` prints the
numbers quoted in docs/protocol.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from device_runtime import OrtRunner, RemoteSegment, ServerClient
from splitexport import (
    OptimizerSpec,
    SegmentRunner,
    SplitModel,
    TorchSegment,
    fit,
    load_bundle,
    max_abs_difference,
)
from splitexport._cli import main as splitexport_cli
from tests._support import TOKEN, make_bundle, threaded_server

CUTS = {"mlp": ["relu1", "relu2"], "resnet": ["layer1", "layer3"]}
LR = {"mlp": 0.3, "resnet": 0.02}
"""Plain SGD (what ONNX Runtime offers besides AdamW); these rates reach >= 0.9 in EPOCHS."""
EPOCHS = {"mlp": 6, "resnet": 5}


@pytest.fixture(scope="module", params=["mlp", "resnet"])
def onnx_bundle(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    path = make_bundle(tmp_path_factory.mktemp("ort") / name, name, CUTS[name], OptimizerSpec(name="sgd", lr=LR[name]))
    assert splitexport_cli(["export", str(path), "--format", "onnx"]) == 0
    return name, path


def runners(bundle_path: Path, server: SegmentRunner | None) -> list[SegmentRunner]:
    """ORT for the device segments (fresh from the artifacts); ``server`` or torch for B."""
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    return [
        OrtRunner.from_bundle(bundle, s.name, optimizer=m.optimizer) if s.role == "device"
        else server or TorchSegment(bundle.torch_segment(s.name), m.optimizer, loss=m.loss.kind, input_grad=True)
        for s in m.segments
    ]


def weights(model: SplitModel, server_b: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for r in model.runners:
        if isinstance(r, OrtRunner):
            state.update(r.state_dict())
        elif isinstance(r, TorchSegment):
            state.update(r.module.state_dict())
        else:
            assert server_b is not None
            state.update(server_b)
    return state


def test_ort_devices_over_http_equal_in_process(onnx_bundle: tuple[str, Path], digits, tmp_path: Path) -> None:
    name, path = onnx_bundle
    with threaded_server(path, tmp_path / "state", checkpoint_every=1000) as (url, state):
        remote = RemoteSegment(ServerClient(url, TOKEN))
        http_model = SplitModel(runners(path, remote))
        history = fit(http_model, digits, name="http", epochs=EPOCHS[name], batch_size=32, progress=False)
        server_b = {k: v.clone() for k, v in state.segment.module.state_dict().items()}
        steps = state.applied_steps
    local_model = SplitModel(runners(path, None))
    local = fit(local_model, digits, name="local", epochs=EPOCHS[name], batch_size=32, progress=False)

    diff, where = max_abs_difference(weights(http_model, server_b), weights(local_model))
    acc = history.epochs[-1].test_accuracy
    print(f"\n{name} A|B|C, ORT devices over HTTP vs in process, {steps} steps: max |dw| = {diff:.3e} ({where}); "
          f"test accuracy {acc:.4f} (in process {local.epochs[-1].test_accuracy:.4f})")
    assert steps == remote.step == EPOCHS[name] * 43
    assert diff == 0.0, f"{where} differs by {diff}"  # the same ORT and torch kernels on the same inputs
    assert acc >= 0.90
