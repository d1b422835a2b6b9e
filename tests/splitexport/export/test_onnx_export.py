"""`splitexport export --format onnx`: artifacts per device segment, recorded with hashes, loadable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from splitexport import (
    BundleIntegrityError,
    ExportError,
    OptimizerSpec,
    SourceSpec,
    load_bundle,
    partition,
    write_bundle,
)
from splitexport._cli import main
from splitexport.export import DeviceOptimizer, export_onnx
from splitexport.models import mlp, resnet_cnn

SOURCE = SourceSpec(file_name="model.pt", sha256="0" * 64, kind="state_dict")
MODELS = ("training_model", "forward_model", "eval_model", "optimizer_model")


def make_bundle(path: Path, factory=resnet_cnn, cuts=("layer1", "layer3"), optimizer: OptimizerSpec | None = None):
    torch.manual_seed(0)
    part = partition(factory(), list(cuts), torch.zeros(2, 1, 8, 8))
    return write_bundle(part, path, source=SOURCE, optimizer=optimizer or OptimizerSpec(name="sgd", lr=0.05))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    bundle = make_bundle(tmp_path_factory.mktemp("onnx") / "bundle")
    return export_onnx(bundle, ort_format=True)


def test_every_device_segment_gets_recorded_artifacts(exported) -> None:
    b = load_bundle(exported.path)  # verifies the sha256 of every file, the new ones included
    arts = {s.name: s.artifacts.get("onnx") for s in b.manifest.segments}
    assert arts["B"] is None  # the server segment stays torch-only
    for name in ("A", "C"):
        art = arts[name]
        assert art is not None
        kinds = set(art)
        assert kinds == {*MODELS, "checkpoint", *(f"{m}_ort" for m in MODELS)}
        for rel in art.values():
            assert rel.startswith(f"onnx/{name}/") and rel in b.manifest.files
    options: dict[str, Any] = b.manifest.exports["onnx"]
    assert options["optimizer"]["name"] == "sgd" and options["optimizer"]["lr"] == 0.05
    assert options["batch_size"] is None and options["ort_format"] is True and options["opset"] == 17


def test_tampered_artifact_is_refused(tmp_path: Path) -> None:
    b = export_onnx(make_bundle(tmp_path / "b", factory=mlp, cuts=("relu1",)))
    ckpt = b.path / b.manifest.segment("A").artifacts["onnx"]["checkpoint"]
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(BundleIntegrityError, match="checkpoint"):
        load_bundle(b.path)


def test_graph_interfaces(exported) -> None:
    """A takes (input, grad_output); C takes (input, labels) and returns (loss, input_gradient, output)."""
    a = onnx.load(exported.path / "onnx/A/training_model.onnx")
    c = onnx.load(exported.path / "onnx/C/training_model.onnx")
    assert [i.name for i in a.graph.input][:2] == ["input", "grad_output"]
    assert [i.name for i in c.graph.input][:2] == ["input", "labels"]
    assert [o.name for o in c.graph.output][1:3] == ["input_gradient", "output"]
    assert not any(i.name.startswith("input_grad.") for i in c.graph.input)
    for m in (a, c):
        assert m.ir_version <= 10
    batch_dim = a.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic batch
    # the eval model uses the running statistics; the forward model stays in training mode
    ev = onnx.load(exported.path / "onnx/A/eval_model.onnx")
    fw = onnx.load(exported.path / "onnx/A/forward_model.onnx")

    def modes(m: onnx.ModelProto) -> set[int]:
        bn = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
        return {a.i for n in bn for a in n.attribute if a.name == "training_mode"}

    assert modes(ev) == {0} and modes(fw) == {1}


def test_export_leaves_bundle_torch_segments_unchanged(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    before = {k: v.clone() for k, v in b.torch_segment("A").state_dict().items()}
    export_onnx(b)
    after = load_bundle(b.path).torch_segment("A").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and the checkpoint holds the bundle's weights and statistics, not the tracing pass's
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(b.path / "onnx/A/checkpoint"))
    for k in ("stem.1.running_mean", "stem.1.running_var", "stem.0.weight"):
        np.testing.assert_array_equal(state.parameters[k].data, before[k].numpy())


def test_optimizer_mapping() -> None:
    plain = OptimizerSpec(name="sgd", lr=0.1)
    assert DeviceOptimizer.from_spec(plain) == DeviceOptimizer("sgd", 0.1)
    momentum = OptimizerSpec(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    with pytest.raises(ExportError, match="plain `w -= lr \\* g`.*momentum=0.9.*--optimizer sgd"):
        DeviceOptimizer.from_spec(momentum)
    assert DeviceOptimizer.from_spec(momentum, name="sgd", lr=0.01) == DeviceOptimizer("sgd", 0.01)
    adamw = DeviceOptimizer.from_spec(momentum, name="adamw")
    assert (adamw.name, adamw.weight_decay, adamw.adamw_mode) == ("adamw", 5e-4, "torch")
    with pytest.raises(ExportError, match="no Adam with L2 weight decay"):
        DeviceOptimizer.from_spec(OptimizerSpec(name="adam", lr=1e-3, weight_decay=1e-4))
    assert DeviceOptimizer.from_spec(OptimizerSpec(name="adam", lr=1e-3)).name == "adamw"
    assert adamw.matches(OptimizerSpec(name="adamw", lr=0.5, weight_decay=5e-4))
    assert not adamw.matches(OptimizerSpec(name="adamw", lr=0.5, weight_decay=0.0))
    assert not DeviceOptimizer("sgd", 0.1).matches(momentum)


def test_cli_export(tmp_path: Path, capsys) -> None:
    b = make_bundle(tmp_path / "b", optimizer=OptimizerSpec(name="sgd", lr=0.05, momentum=0.9))
    assert main(["export", str(b.path), "--format", "onnx"]) == 2
    assert "--optimizer sgd" in capsys.readouterr().err
    assert "onnx" not in load_bundle(b.path).manifest.exports  # nothing half-written
    code = main(["export", str(b.path), "--format", "onnx", "--optimizer", "adamw", "--lr", "0.001", "--ort-format"])
    assert code == 0
    out = capsys.readouterr().out
    assert "A (gradient)" in out and "C (labels)" in out
    manifest = json.loads((b.path / "manifest.json").read_text())
    assert manifest["exports"]["onnx"]["optimizer"]["name"] == "adamw"
    assert manifest["exports"]["onnx"]["optimizer"]["lr"] == 0.001
    assert (b.path / "onnx/C/training_model.ort").is_file()
    opt = onnx.load(b.path / "onnx/A/optimizer_model.onnx")
    assert [n.op_type for n in opt.graph.node] == ["AdamWOptimizer"]


def test_single_split_exports_only_a(tmp_path: Path) -> None:
    b = export_onnx(make_bundle(tmp_path / "b", cuts=("layer2",)))
    assert [s.name for s in b.manifest.segments if "onnx" in s.artifacts] == ["A"]


def test_bad_options_are_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b", factory=mlp, cuts=("relu1",))
    with pytest.raises(ExportError, match="opset 22"):
        export_onnx(b, opset=22)
    with pytest.raises(ExportError, match="learning rate must be positive"):
        export_onnx(b, lr=-1.0)
