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


class TwoLayerGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 8, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0].flatten(1)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("layer", "features", "op", "layer_name", "hint"),
    [
        (nn.Upsample(scale_factor=2), 1024, "Resize", "layer '0.1' (Upsample)", "ConvTranspose2d"),
        # fx traces through custom modules: the call lands in the segment's own forward
        (Interpolate(), 1024, "Resize", "the call of interpolate() in the segment's forward", "ConvTranspose2d"),
        # ceil_mode is not rewritten: AveragePool stays, and its gradient crashes ORT with a dynamic batch
        (nn.AvgPool2d(3, 2, ceil_mode=True), 64, "AveragePool", "layer '0.1' (AvgPool2d)", "--batch-size N"),
    ],
)
def test_unsupported_op_is_reported(tmp_path: Path, layer, features, op, layer_name, hint) -> None:
    module = segment_a(conv_net(layer, features), tmp_path)
    with pytest.raises(UnsupportedOpError) as info:
        export_a(module, tmp_path)
    msg = str(info.value)
    assert info.value.op == op
    assert f"ONNX op {op}" in msg and layer_name in msg and hint in msg and msg.startswith("segment A:")
    assert "\n" not in msg
    assert not (tmp_path / "out" / "training_model.onnx").exists()


@pytest.mark.parametrize(
    ("model", "layer_name", "hint"),
    [
        (
            nn.Sequential(nn.Sequential(nn.Flatten(1, 2), TwoLayerGRU()), nn.Linear(64, 10)),
            "layer '0.1.rnn' (GRU)",
            "stack single-layer nn.GRUs",
        ),
        (
            nn.Sequential(
                nn.Sequential(nn.Flatten(1, 2), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1)),
                nn.Flatten(),
                nn.Linear(64, 10),
            ),
            "layer '0.1' (TransformerEncoderLayer)",
            "set its dropout to 0",
        ),
    ],
    ids=["two-layer-gru", "encoder-layer-dropout-in-A-not-batch-first"],
)
def test_unsupported_layer_is_reported_before_any_file(tmp_path: Path, model, layer_name, hint) -> None:
    module = segment_a(model, tmp_path)
    with pytest.raises(UnsupportedOpError) as info:
        export_a(module, tmp_path)
    msg = str(info.value)
    assert msg.startswith("segment A: cannot export " + layer_name) and hint in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "layer",
    [nn.Hardswish(), nn.Hardsigmoid(), nn.GroupNorm(2, 4), nn.AvgPool2d(2), nn.AvgPool2d(3, 1, padding=1)],
    ids=["hardswish", "hardsigmoid", "groupnorm", "avgpool", "avgpool-padded"],
)
def test_rewritten_layers_train_like_torch(tmp_path: Path, layer: nn.Module) -> None:
    """Layers ORT cannot train as exported are rewritten; one step equals torch's (dynamic batch)."""
    from device_runtime import OrtSegment

    torch.manual_seed(0)
    model = conv_net(layer, 4 * 8 * 8 if not isinstance(layer, nn.AvgPool2d) or layer.stride == 1 else 64)
    part = partition(model, ["0"], torch.zeros(2, 1, 8, 8))
    module = segment_a(model, tmp_path)
    paths = export_a(module, tmp_path)
    seg = OrtSegment.from_directory(paths["training_model"].parent, learning_rate=0.1)
    reference = part.segments[0].module
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in (3, 5):
        x = torch.randn(batch, 1, 8, 8)
        out = seg.forward(x.numpy())
        ref = reference(x)
        assert float((ref - torch.from_numpy(out)).abs().max()) < 1e-5
        g = torch.randn(ref.shape)
        seg.train_with_gradient(x.numpy(), g.numpy())
        opt.zero_grad()
        (ref * g).sum().backward()
        opt.step()
    state = reference.state_dict()
    for k, v in seg.parameters().items():
        assert float((torch.from_numpy(v) - state[k]).abs().max()) < 1e-5, k


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


@pytest.mark.parametrize("opset", [15, 17])
def test_layernorm_trains_at_the_default_opset(tmp_path: Path, opset: int) -> None:
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32)), nn.Linear(32, 10))
    export_a(segment_a(model, tmp_path), tmp_path, opset=opset)  # runs a training step on the artifacts


def test_dropout_in_a_takes_masks_as_inputs(tmp_path: Path) -> None:
    from device_runtime import OrtSegment

    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.2)), nn.Linear(32, 10))
    masks: list = []
    paths = export_a(segment_a(model, tmp_path), tmp_path, masks_out=masks)
    assert [(m.name, m.p, m.shape, m.layer) for m in masks] == [("dropout_mask_0", 0.2, (32,), "0.2")]
    seg = OrtSegment.from_directory(paths["training_model"].parent, seed=0)
    assert seg.dropout_masks == [("dropout_mask_0", 0.2, (32,))]
    x = np.ones((4, 1, 8, 8), dtype=np.float32)
    with pytest.raises(Exception, match="call forward"):
        seg.train_with_gradient(x, np.ones((4, 32), dtype=np.float32))
    out = seg.forward(x)
    assert (out == 0).any()  # dropped units
    seg.train_with_gradient(x, np.ones_like(out))
    # in the last segment one step runs forward and backward: ORT's own Dropout, no masks
    last = nn.Sequential(nn.Linear(32, 16), nn.Dropout(0.5), nn.Linear(16, 10))
    export_segment_onnx(last, (32,), tmp_path / "c", is_last=True, optimizer=SGD, name="C", masks_out=masks)
    # p=0 needs no mask
    model0 = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.0)), nn.Linear(32, 10))
    export_a(segment_a(model0, tmp_path), tmp_path, masks_out=masks)
    assert len(masks) == 1


def test_two_dropout_layers_get_independent_masks(tmp_path: Path) -> None:
    """Two same-shaped Dropouts in A (tests/op_models.py TwoDropouts): two mask inputs, drawn one after the other
    from OrtSegment's generator, so they differ; the sent activation is cat(h * mask_0, h * mask_1) and the step
    trains on both (torch with those masks, 1e-5)."""
    from device_runtime import OrtSegment
    from tests.op_models import TwoDropouts

    torch.manual_seed(0)
    model = TwoDropouts()
    masks: list = []
    export_segment_onnx(model, (12,), tmp_path, is_last=False, optimizer=SGD, name="A", masks_out=masks)
    assert [(m.p, m.shape, m.layer) for m in masks] == [(0.5, (16,), "d1"), (0.5, (16,), "d2")]
    seg = OrtSegment.from_directory(tmp_path, learning_rate=0.1, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, g = torch.randn(8, 12, generator=gen), torch.randn(8, 32, generator=gen)
        w, b = (torch.from_numpy(seg.parameters()[k]) for k in ("fc.weight", "fc.bias"))
        sent = torch.from_numpy(seg.forward(x.numpy()))
        m1, m2 = (torch.from_numpy(m) for m in seg._masks)  # type: ignore[union-attr]
        assert float((m1 == m2).float().mean()) < 0.75  # independent Bernoulli(0.5) masks agree on ~half
        h = F.linear(x, w, b)
        assert float((sent - torch.cat([h * m1, h * m2], 1)).abs().max()) <= 1e-5
        seg.train_with_gradient(x.numpy(), g.numpy())
        gh = g[:, :16] * m1 + g[:, 16:] * m2
        assert float((torch.from_numpy(seg.parameters()["fc.weight"]) - (w - 0.1 * gh.T @ x)).abs().max()) <= 1e-5


def test_errors_are_export_errors() -> None:
    assert issubclass(UnsupportedOpError, ExportError)


class AttentionHead(nn.Module):
    """A last segment: TransformerEncoderLayer with dropout 0.1 (attention weights, feed-forward, residuals)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(x).mean(dim=1))


def test_attention_dropout_in_the_last_segment_trains_and_converges(tmp_path: Path) -> None:
    """Dropout inside nn.TransformerEncoderLayer (its MultiheadAttention included) in C: ORT draws the masks in the
    training step (C sends no activation, so no mask has to be reused); the exported Dropouts get their mask
    output, which ORT's Dropout gradient reads. Not bit-comparable with torch: checked to converge."""
    from device_runtime import OrtSegment

    torch.manual_seed(0)
    part = partition(nn.Sequential(nn.Identity(), AttentionHead()), ["0"], torch.zeros(2, 6, 8))
    path = tmp_path / "c.pt"
    torch.jit.save(torch.jit.script(part.segments[1].module), str(path))
    export_segment_onnx(load_torch_segment(path, "torchscript"), (6, 8), tmp_path / "out", is_last=True,
                        optimizer=DeviceOptimizer("sgd", 0.1), name="C")
    seg = OrtSegment.from_directory(tmp_path / "out", learning_rate=0.1)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(80):
        x = torch.randn(16, 6, 8, generator=gen)
        y = (x[:, :, 0].mean(dim=1) > 0).long()
        loss, gx = seg.train_with_labels(x.numpy(), y.numpy())
        assert np.isfinite(gx).all()
        losses.append(loss)
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    print(f"\nattention dropout 0.1 in C (ORT): cross-entropy {first:.3f} (first 10 steps) -> {last:.3f} (last 10 of 80)")
    assert last < 0.7 * first, (first, last)


def test_attention_dropout_in_the_first_segment_trains_and_converges(tmp_path: Path) -> None:
    """Dropout inside nn.TransformerEncoderLayer in A (trained on a received gradient): the layer is written out
    with its dropouts (attention weights per head, residual branches, feed-forward) as mask inputs, drawn in
    forward and reused by the training step. Not bit-comparable with torch: checked to converge, a torch head
    on top playing the server."""
    from device_runtime import OrtSegment

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Flatten(1, 2), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)),
        nn.Flatten(),
        nn.Linear(64, 2),
    )
    masks: list = []
    paths = export_a(segment_a(model, tmp_path), tmp_path, masks_out=masks)
    assert sorted({m.layer for m in masks}) == ["0.1.dropout", "0.1.dropout1", "0.1.dropout2", "0.1.self_attn.attn_dropout"]
    assert [m.shape for m in masks if m.layer.endswith("attn_dropout")] == [(8, 8), (8, 8)]  # one per head
    seg = OrtSegment.from_directory(paths["training_model"].parent, learning_rate=0.1, seed=0)
    before = {k: v.copy() for k, v in seg.parameters().items()}
    head = nn.Linear(64, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(80):
        x = torch.randn(16, 1, 8, 8, generator=gen)
        y = (x[:, 0, :, 0].mean(dim=1) > 0).long()
        out = torch.from_numpy(seg.forward(x.numpy())).requires_grad_(True)
        loss = F.cross_entropy(head(out.flatten(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert out.grad is not None
        seg.train_with_gradient(x.numpy(), out.grad.numpy())
        losses.append(loss.item())
    after = seg.parameters()
    assert all(np.isfinite(v).all() for v in after.values())
    assert not np.allclose(after["0.1.self_attn.in_proj_weight"], before["0.1.self_attn.in_proj_weight"])
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    print(f"\nattention dropout 0.1 in A (ORT): cross-entropy {first:.3f} (first 10 steps) -> {last:.3f} (last 10 of 80)")
    assert last < 0.7 * first, (first, last)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, 2)
        return self.attn(x, x, x)[0]  # type: ignore[no-any-return]


def test_multihead_attention_dropout_in_the_first_segment_takes_a_mask_per_head(tmp_path: Path) -> None:
    """A scripted nn.MultiheadAttention(dropout=0.2) alone in A: one mask input per head on its attention weights
    (the export runs a training step on the artifacts)."""
    from device_runtime import OrtSegment

    masks: list = []
    paths = export_a(segment_a(nn.Sequential(SelfAttention(), nn.Flatten(), nn.Linear(64, 2)), tmp_path), tmp_path,
                     masks_out=masks)
    assert [(m.layer, m.p, m.shape) for m in masks] == [("0.attn.attn_dropout", 0.2, (8, 8))] * 2
    seg = OrtSegment.from_directory(paths["training_model"].parent, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    out = seg.forward(x)
    before = seg.parameters()["0.attn.in_proj_weight"].copy()
    seg.train_with_gradient(x, np.ones_like(out))
    after = seg.parameters()["0.attn.in_proj_weight"]
    assert np.isfinite(after).all() and not np.allclose(after, before)
