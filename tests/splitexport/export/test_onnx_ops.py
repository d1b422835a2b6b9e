"""Ops ONNX Runtime cannot train are found at export, named with their torch layer and a way out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitexport import ExportError, partition
from splitexport._bundle import load_torch_segment
from splitexport.export import DeviceOptimizer, UnsupportedOpError, export_segment_onnx

SGD = DeviceOptimizer("sgd", 0.1)


class Interpolate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0)


def conv_net(layer: nn.Module, features: int) -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layer), nn.Flatten(), nn.Linear(features, 10))


def segment_a(model: nn.Module, tmp_path: Path) -> nn.Module:
    """Segment A (the first top-level child) as the bundle stores it: TorchScript."""
    part = partition(model, ["0"], torch.zeros(2, 1, 8, 8))
    path = tmp_path / "a.pt"
    torch.jit.save(torch.jit.script(part.segments[0].module), str(path))
    return load_torch_segment(path, "torchscript")


def export_a(module: nn.Module, tmp_path: Path, **kwargs) -> dict[str, Path]:
    return export_segment_onnx(module, (1, 8, 8), tmp_path / "out", is_last=False, optimizer=SGD, name="A", **kwargs)


@pytest.mark.parametrize(
    ("layer", "features", "op", "layer_name", "hint"),
    [
        (nn.Hardswish(), 256, "HardSwish", "layer '0.1' (Hardswish)", "runs on the server, or replace it"),
        (nn.Upsample(scale_factor=2), 1024, "Resize", "layer '0.1' (Upsample)", "ConvTranspose2d"),
        # fx traces through custom modules: the call lands in the segment's own forward
        (Interpolate(), 1024, "Resize", "the call of interpolate() in the segment's forward", "ConvTranspose2d"),
        (nn.AvgPool2d(2), 64, "AveragePool", "layer '0.1' (AvgPool2d)", "--batch-size N"),
    ],
)
def test_unsupported_op_is_reported(tmp_path: Path, layer, features, op, layer_name, hint) -> None:
    module = segment_a(conv_net(layer, features), tmp_path)
    with pytest.raises(UnsupportedOpError) as info:
        export_a(module, tmp_path)
    msg = str(info.value)
    assert info.value.op == op
    assert f"ONNX op {op}" in msg and layer_name in msg and hint in msg and msg.startswith("segment A:")
    assert not (tmp_path / "out" / "training_model.onnx").exists()


def test_average_pool_trains_with_a_fixed_batch(tmp_path: Path) -> None:
    module = segment_a(conv_net(nn.AvgPool2d(2), 64), tmp_path)
    paths = export_a(module, tmp_path, batch_size=4)  # runs a training step on the artifacts
    from device_runtime import OrtRuntimeError, OrtSegment

    seg = OrtSegment.from_directory(paths["training_model"].parent)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    out = seg.forward(x)
    seg.train_with_gradient(x, np.ones_like(out))
    with pytest.raises(OrtRuntimeError, match="batch"):
        seg.forward(x[:3])


def test_layernorm_needs_opset_15(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32)), nn.Linear(32, 10))
    module = segment_a(model, tmp_path)
    with pytest.raises(
        UnsupportedOpError, match=r"layer '0.2' \(LayerNorm\).*LayerNormalization at opset 17.*--opset 15"
    ):
        export_a(module, tmp_path)
    export_a(module, tmp_path, opset=15)


def test_dropout_is_refused_where_it_would_not_be_exact(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.2)), nn.Linear(32, 10))
    module = segment_a(model, tmp_path)
    with pytest.raises(UnsupportedOpError, match=r"layer '0.2' \(Dropout\).*different dropout masks"):
        export_a(module, tmp_path)
    # in the last segment one step runs forward and backward: dropout is fine there
    last = nn.Sequential(nn.Linear(32, 16), nn.Dropout(0.5), nn.Linear(16, 10))
    export_segment_onnx(last, (32,), tmp_path / "c", is_last=True, optimizer=SGD, name="C")
    # p=0 is harmless in A
    model0 = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.0)), nn.Linear(32, 10))
    export_a(segment_a(model0, tmp_path), tmp_path)


def test_errors_are_export_errors() -> None:
    assert issubclass(UnsupportedOpError, ExportError)
