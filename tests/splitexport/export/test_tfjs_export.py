"""torch segment -> tf_keras -> TF.js layers model: mapping, artifacts, CLI, and export-time errors."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from splitexport import ExportError, OptimizerSpec, SourceSpec, load_bundle, partition, write_bundle
from splitexport._bundle import load_torch_segment
from splitexport._cli import main
from splitexport.export._layergraph import layer_graph
from splitexport.models import FACTORIES, mlp
from tests.tf_reference import Zoo

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tf_keras")
os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
pytest.importorskip("tensorflowjs")

from splitexport.export._keras import keras_model
from splitexport.export._tfjs import export_tfjs_segment, write_tfjs


class _Wrap(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_keras_model_matches_torch_in_both_modes(arch: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    for seg in partition(FACTORIES[arch](), ["stem" if arch != "mlp" else "relu1"], x).segments:
        model = keras_model(layer_graph(seg.module, seg.input_shape))
        m = copy.deepcopy(seg.module)
        with torch.no_grad():
            train_ref, eval_ref = m.train()(x).numpy(), m.eval()(x).numpy()
        assert np.abs(model(x.numpy(), training=True).numpy() - train_ref).max() < 1e-5
        assert np.abs(model(x.numpy(), training=False).numpy() - eval_ref).max() < 1e-5
        with torch.no_grad():
            x = seg.module.eval()(x)


def test_every_supported_layer_maps_and_torchscript_reads_the_same() -> None:
    torch.manual_seed(0)
    zoo = Zoo(nn.GELU).eval()
    x = torch.rand(4, 1, 8, 8)
    graph = layer_graph(fx.symbolic_trace(zoo), (4, 1, 8, 8))
    kinds = {lyr.kind for lyr in graph.layers}
    assert {
        "conv2d",
        "depthwise2d",
        "batchnorm",
        "tanh",
        "gelu",
        "relu",
        "concat",
        "maxpool2d",
        "flatten",
        "linear",
    } <= kinds
    with torch.no_grad():
        ref = zoo(x).numpy()
    assert np.abs(keras_model(graph)(x.numpy(), training=False).numpy() - ref).max() < 1e-5
    scripted = torch.jit.script(partition(FACTORIES["resnet_cnn"](), ["layer1"], x).segments[0].module)
    eager = partition(FACTORIES["resnet_cnn"](), ["layer1"], x).segments[0].module
    assert layer_graph(scripted, (4, 1, 8, 8)).weight_names() == layer_graph(eager, (4, 1, 8, 8)).weight_names()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.LayerNorm([1, 8, 8]), r"layer 'body\.0' \(LayerNorm\): only LayerNorm over the last dimension"),
        (nn.ConvTranspose2d(1, 2, 2), r"'body\.0' \(ConvTranspose2d\) is not supported"),
        (nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.MaxPool2d(3, stride=1, padding=1), "without padding"),
        (nn.BatchNorm2d(1, affine=False), "affine=True"),
        (nn.PReLU(), r"\(PReLU\) is not supported"),
    ],
)
def test_unsupported_layers_are_export_errors_naming_the_layer(layer: nn.Module, message: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=message):
        export_tfjs_segment(fx.symbolic_trace(_Wrap(layer)), (2, 1, 8, 8), tmp_path, is_last=True)


class _Softplus(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x) * 2


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] > 3:
            x = x * x
        return self.fc(x)


def _double(x: torch.Tensor) -> torch.Tensor:
    return x + x


class _UserFunction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _double(x)


@pytest.mark.parametrize(("segment", "message"), [
    (lambda: fx.symbolic_trace(_Softplus()), (r"^node 'softplus' calls softplus, which has no export mapping; cut so "
                                              "that it runs on the server$")),
    # a bundle's TorchScript copy, read as fx with aten overloads: the same node, named by its aten op
    (lambda: torch.jit.script(_Softplus()), (r"^node 'softplus' calls aten\.softplus\.default, which has no export "
                                             "mapping; cut so that it runs on the server$")),
    (lambda: torch.jit.script(_Branch()), (r"^the TorchScript forward uses prim::If, which splitexport cannot rebuild "
                                          "as a graph; cut so that it runs on the server$")),
    (lambda: torch.jit.script(_UserFunction()), (r"^the TorchScript forward calls the scripted function "
                                                 r"tests\.splitexport\.export\.test_tfjs_export\._double, which "
                                                 "splitexport cannot rebuild as a graph; cut so that it runs on the "
                                                 "server$")),
], ids=["fx", "torchscript", "torchscript_control_flow", "torchscript_user_function"])
def test_unmapped_functional_ops_are_refused(segment: Callable[[], nn.Module], message: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=message):
        export_tfjs_segment(segment(), (2, 1, 8, 8), tmp_path, is_last=True)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_dropout_is_a_seeded_dropout_layer_in_every_segment(tmp_path: Path) -> None:
    gm = fx.symbolic_trace(_Wrap(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10)))
    for is_last in (False, True):
        files = export_tfjs_segment(gm, (2, 1, 8, 8), tmp_path / str(is_last), is_last=is_last)
        topology = json.loads(files["model"].read_text())["modelTopology"]["model_config"]["config"]["layers"]
        assert "SeededDropout" in {layer["class_name"] for layer in topology}


def test_two_dropout_layers_draw_different_masks_tfjs(tmp_path: Path) -> None:
    """The JS runtime on the exporter's TwoDropouts (device_runtime/js/test/layers_ops.test.js): the two
    same-shaped Dropout layers start their seeds apart, so their masks differ at every step; the step trains on
    both masks that were sent (1e-5), and both seeds advance."""
    import shutil
    import subprocess

    from tests.device_runtime.tfjs_fixtures import JS
    from tests.op_models import TwoDropouts

    node = shutil.which("node")
    assert node, "node (>= 18) is required for the JS device runtime tests"
    torch.manual_seed(0)
    export_tfjs_segment(fx.symbolic_trace(TwoDropouts()), (8, 12), tmp_path, is_last=False,
                        optimizer={"name": "sgd", "lr": 0.1})
    env = {**os.environ, "SPLITEXPORT_TFJS_TWO_DROPOUTS": str(tmp_path)}
    proc = subprocess.run([node, "--test", "--test-name-pattern", "two SeededDropout", "test/layers_ops.test.js"],
                          cwd=JS, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "(exported) draw different masks" in proc.stdout and "\n# pass 1" in proc.stdout, proc.stdout[-3000:]


def test_artifacts_are_a_trainable_layers_model(tmp_path: Path) -> None:
    seg = partition(FACTORIES["mobilenet_cnn"](), ["block1"], torch.zeros(2, 1, 8, 8)).segments[0]
    files = write_tfjs(layer_graph(seg.module, seg.input_shape), tmp_path, is_last=False, optimizer={"lr": 0.01})
    doc = json.loads(files["model"].read_text())
    assert doc["format"] == "layers-model"
    classes = {layer["class_name"] for layer in doc["modelTopology"]["model_config"]["config"]["layers"]}
    assert "DepthwiseConv2D" in classes and not any("Lambda" in c for c in classes)
    meta = json.loads(files["meta"].read_text())
    assert meta["trains_with"] == "gradient" and meta["optimizer"]["lr"] == 0.01
    assert meta["input_shape"] == [1, 8, 8] and meta["output_shape"] == [32, 8, 8]
    assert meta["torch_names"]["block1_depthwise/depthwise_kernel"] == ["block1.depthwise.weight", "depthwise2d:1"]
    assert all(p.is_file() for p in files.values())


def test_cli_exports_every_device_segment_into_the_bundle(tmp_path: Path) -> None:
    part = partition(mlp(), ["relu1", "relu2"], torch.zeros(2, 1, 8, 8))
    source = SourceSpec(file_name="model.pt", sha256="0" * 64, kind="state_dict")
    b = write_bundle(part, tmp_path / "b", source=source, optimizer=OptimizerSpec(name="sgd", lr=0.05))
    assert main(["export", str(b.path), "--format", "tfjs", "--lr", "0.02"]) == 0
    bundle = load_bundle(b.path)  # verifies every sha256
    for spec in bundle.manifest.segments:
        arts = spec.artifacts.get("tfjs", {})
        assert bool(arts) == (spec.role == "device")
        if arts:
            meta = json.loads(bundle.file(arts["meta"]).read_text())
            assert meta["is_last"] == spec.is_last and meta["optimizer"]["lr"] == 0.02
            torch_seg = load_torch_segment(bundle.file(spec.torch_file), spec.torch_format)
            assert set(meta["torch_names"].values().__iter__().__next__()[:1]) <= set(torch_seg.state_dict())
