"""Every zoo model exports to ONNX Runtime from the CLI and trains like torch, step by step (issue 10).

The bundle is made and exported by the CLI (``--arch tests.zoo:<name>``), so the exporter reads
the bundle's TorchScript segments. A (ORT) | B (torch) | C (ORT) then trains 20 SGD steps with
torch copies of A and C in lockstep: after every step the device weights (and BatchNorm
statistics) and C's input gradient must match torch within 1e-5. (Torch split = monolithic
training is ``tests/splitexport/test_zoo_equivalence.py``.) Models with Dropout train on the device with masks ORT draws (not
torch's), so they are checked to converge instead, and once more with p=0 for exactness.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime.training")

from device_runtime import OrtRunner, OrtSegment
from splitexport import OptimizerSpec, load_bundle, named_state, partition
from splitexport._cli import main
from splitexport._torch_segment import TorchSegment
from splitexport.export import DeviceOptimizer, export_segment_onnx
from tests.zoo import ZOO, ZooModel, tabular_mlp_p0
from tests.zoo_results import record

STEPS = 20
BATCH = 8
TOL = 1e-5
SGD = OptimizerSpec(name="sgd", lr=0.05)
P0 = "tabular_mlp_p0"
"""The tabular MLP with Dropout p=0: exact like the others."""
EXACT = [*sorted(n for n, m in ZOO.items() if not m.dropout), P0]


def _zoo(name: str) -> ZooModel:
    if name == P0:
        return dataclasses.replace(ZOO["tabular_mlp"], name=P0, factory=tabular_mlp_p0, dropout=False)
    return ZOO[name]


def _bundle(tmp_path: Path, name: str) -> Path:
    zm = _zoo(name)
    torch.manual_seed(0)
    model_file = tmp_path / "model.pt"
    torch.save(zm.factory().state_dict(), model_file)
    bundle = tmp_path / "bundle"
    cuts = [a for c in zm.cuts["double"] for a in ("--cut", c)]
    common = ["--arch", zm.arch, "--input-shape", zm.cli_input_shape(), "--input-dtype", zm.dtype_name]
    assert main(["partition", str(model_file), *cuts, *common, "--loss", zm.loss, "-o", str(bundle)]) == 0
    assert main(["export", str(bundle), "--format", "onnx"]) == 0
    return bundle


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for k, v in a.items():
        d = float((v.double() - b[k].double()).abs().max()) if v.numel() else 0.0
        assert not np.isnan(d), f"{k} is NaN"
        if d > worst:
            worst, where = d, k
    return worst, where


def _lockstep(bundle: Path, name: str, steps: int) -> tuple[float, float, list[float]]:
    """ORT A | torch B | ORT C, with torch copies of A and C fed exactly what the ORT segments get.

    Each step torch's C trains on the activation ORT's C receives and torch's A on the gradient
    ORT's A receives, so the comparison is of the device segments' steps themselves: a 1e-6
    difference in A's output cannot flip a ReLU gate inside B (float32 kinks, see docs/onnx.md)
    and be blamed on ORT. Returns (max |dw|, max |d input grad|, ORT losses).
    """
    zm = _zoo(name)
    b = load_bundle(bundle)
    torch_a, torch_c = b.torch_segment("A"), b.torch_segment("C")
    ref_a = TorchSegment(torch_a, SGD, loss=zm.loss, input_grad=False)
    ref_c = TorchSegment(torch_c, SGD, loss=zm.loss)
    a = OrtRunner.from_bundle(b, "A", optimizer=SGD, threads=1)  # no spinning pool on a shared CI machine
    c = OrtRunner.from_bundle(b, "C", optimizer=SGD, threads=1)
    middle = TorchSegment(b.torch_segment("B"), SGD, loss=zm.loss)
    assert b.manifest.segments[0].input.dtype == zm.dtype_name
    x, y = zm.data(steps * BATCH, 0)
    worst_w = worst_g = 0.0
    losses = []
    for step in range(steps):
        xb, yb = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]
        ref_a.forward(xb)
        act = middle.forward(a.forward(xb))
        _, g_ref, _ = ref_c.train_with_labels(act, yb)
        loss, g_dev, _ = c.train_with_labels(act, yb)
        assert g_ref is not None and g_dev is not None
        worst_g = max(worst_g, float((g_ref - g_dev).abs().max()))
        g_a = middle.train_with_gradient(g_dev)
        assert g_a is not None
        a.train_with_gradient(g_a)
        ref_a.train_with_gradient(g_a)
        losses.append(loss)
        ref_state = named_state([torch_a, torch_c])
        dev_state = {**a.state_dict(), **c.state_dict()}
        assert set(dev_state) <= set(ref_state), set(dev_state) - set(ref_state)
        dw, where = _max_diff(dev_state, ref_state)
        worst_w = max(worst_w, dw)
        if not zm.dropout:
            assert worst_w <= TOL and worst_g <= TOL, f"{name} step {step}: |dw| {dw:.2e} ({where}), |dg| {worst_g:.2e}"
    return worst_w, worst_g, losses


@pytest.mark.parametrize("name", EXACT)
def test_zoo_trains_in_ort_like_torch(tmp_path: Path, name: str) -> None:
    bundle = _bundle(tmp_path, name)
    dw, dg, _ = _lockstep(bundle, name, STEPS)
    print(f"{name}: {STEPS} steps, max |dw| {dw:.2e}, max |d input grad| {dg:.2e}")
    assert dw <= TOL and dg <= TOL
    record(name.removesuffix("_p0"), "onnx", max(dw, dg), note="Dropout p=0" if name == P0 else "")


def test_dropout_model_trains_and_converges(tmp_path: Path) -> None:
    name = "tabular_mlp"
    bundle = _bundle(tmp_path, name)
    opts = load_bundle(bundle).manifest.exports["onnx"]
    masks = opts["dropout_masks"]
    assert isinstance(masks, dict) and [m["p"] for m in masks["A"]] == [0.1] and "C" not in masks
    _, _, losses = _lockstep(bundle, name, 150)
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    print(f"{name}: MSE {first:.4f} (first 10 steps) -> {last:.4f} (last 10 of 150)")
    assert last < 0.5 * first
    record(name, "dropout_onnx", f"MSE {first:.3f} -> {last:.3f} in 150 steps")


def test_dropout_masks_are_reused_by_the_step(tmp_path: Path) -> None:
    """With the masks ORT drew fed to torch, A's step equals torch's (the mask is the same in both passes)."""
    zm = ZOO["tabular_mlp"]
    torch.manual_seed(0)
    part = partition(zm.factory(), zm.cuts["double"], zm.example())
    seg = part.segments[0]
    masks: list = []
    export_segment_onnx(seg.module, seg.input_shape[1:], tmp_path, is_last=False,
                        optimizer=DeviceOptimizer("sgd", 0.05), name="A", masks_out=masks)
    assert [m.layer for m in masks] == ["block1.3"]
    ort_a = OrtSegment.from_directory(tmp_path, learning_rate=0.05, seed=3)
    x, _ = zm.data(BATCH, 1)
    reference = copy.deepcopy(seg.module)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(3):
        out = ort_a.forward(x.numpy())
        mask = torch.from_numpy(ort_a._masks[0])  # type: ignore[index]
        assert 0.8 < float((mask > 0).float().mean()) < 1.0
        g = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
        ort_a.train_with_gradient(x.numpy(), g)
        # torch: the same layers, dropout replaced by the drawn mask
        h = reference.get_submodule("block1.2")(reference.get_submodule("block1.1")(reference.get_submodule("block1.0")(x)))
        out_t = h * mask
        assert float((out_t - torch.from_numpy(out)).abs().max()) < 1e-5, (out_t[:2, :6], out[:2, :6], mask[:2, :6])
        opt.zero_grad()
        (out_t * torch.from_numpy(g)).sum().backward()
        opt.step()
    ref = dict(reference.named_parameters())
    diff = max(float((torch.from_numpy(v) - ref[k].detach()).abs().max()) for k, v in ort_a.parameters().items())
    assert diff <= TOL, diff
