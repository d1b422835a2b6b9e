"""A defended A (NoPeek, activation noise) in ONNX Runtime trains like torch with the same noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from splitexport import Dataset, OptimizerSpec, SourceSpec, load_bundle, partition, write_bundle
from splitexport._manifest import DefenceSpec
from splitexport.export import export_onnx
from splitexport.models import mlp
from splitexport.simulation import simulate

pytest.importorskip("onnxruntime.training")

from device_runtime import OrtSegment

SPECS = {"nopeek": DefenceSpec(nopeek=0.5), "noise": DefenceSpec(activation_noise=0.3),
         "both": DefenceSpec(nopeek=1.0, activation_noise=0.1)}


def _exported(tmp_path: Path, spec: DefenceSpec, opset: int = 17) -> Path:
    torch.manual_seed(0)
    part = partition(mlp(), ["relu1"], torch.zeros(1, 1, 8, 8))
    path = tmp_path / "b"
    write_bundle(part, path, source=SourceSpec(file_name="mlp.pt", sha256="0" * 64, kind="test"),
                 optimizer=OptimizerSpec(name="sgd", lr=0.05), defence=spec)
    export_onnx(path, opset=opset)
    return path


@pytest.mark.parametrize(("kind", "opset"), [*((k, 17) for k in SPECS), ("nopeek", 18)])
def test_ort_device_with_a_defence_trains_like_torch(kind: str, opset: int, tmp_path: Path, digits: Dataset) -> None:
    """ORT A + torch B vs the monolithic model with the same dCor term and noise: 4 steps, weight by weight.
    (Opset 18 moves ReduceMean's axes from an attribute to an input.)"""
    spec = SPECS[kind]
    path = _exported(tmp_path, spec, opset)
    bundle = load_bundle(path)
    assert bundle.manifest.exports["onnx"]["defence"]["nopeek"] == spec.nopeek  # type: ignore[index]
    arts = {k: bundle.file(v) for k, v in bundle.segment("A").artifacts["onnx"].items()}
    forward = onnx.load(str(arts["forward_model"]))
    assert ("activation_noise" in [i.name for i in forward.graph.input]) == (spec.activation_noise > 0)
    training = onnx.load(str(arts["training_model"]))
    assert any(n.output[0] == "nopeek_dcor" for n in training.graph.node) == (spec.nopeek > 0)

    data = Dataset("digits-subset", digits.x_train[:128], digits.y_train[:128], digits.x_test[:64],
                   digits.y_test[:64], 10)
    result = simulate(bundle, dataset=data, epochs=1, batch_size=32, device_runtime="onnx", progress=False, log=None)
    torch_diff, _ = result.differences["split (torch)"]
    ort_diff, where = result.differences["split (onnx devices)"]
    print(f"{kind}: |torch split - mono| {torch_diff:.3g}, |ORT split - mono| {ort_diff:.3g} ({where})")
    assert torch_diff < 1e-7
    assert ort_diff < 1e-5, where


def test_ort_forward_sends_the_seeded_noise(tmp_path: Path) -> None:
    path = _exported(tmp_path, SPECS["noise"])
    seg = OrtSegment.from_bundle(path, "A", seed=7)
    assert seg.defence["activation_noise"] == 0.3
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    sent = seg.forward(x)
    noise = np.random.default_rng(7).standard_normal(sent.shape, dtype=np.float32)
    np.testing.assert_allclose(sent, seg.evaluate(x) + 0.3 * noise, rtol=0, atol=1e-6)  # the MLP's A: no BN/dropout
    assert not np.allclose(seg.forward(x), sent)  # a fresh draw per forward
