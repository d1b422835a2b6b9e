"""TFLite training export: signatures, builtin-only conversion, CLI, and export-time errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from splitexport import ExportError, OptimizerSpec, SourceSpec, load_bundle, partition, write_bundle
from splitexport._cli import main
from splitexport.export._layergraph import layer_graph
from splitexport.models import mlp
from tests.tf_reference import Zoo

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow")
ai_edge_litert = pytest.importorskip("ai_edge_litert.interpreter")

from splitexport.export._tflite import tflite_model_bytes


def test_builtin_variant_has_the_signatures_and_runs_on_stock_litert() -> None:
    graph = layer_graph(fx.symbolic_trace(Zoo()), (8, 1, 8, 8))
    data, meta = tflite_model_bytes(graph, is_last=True, variant="builtin", batch_size=8)
    interp = ai_edge_litert.Interpreter(model_content=data)  # no Flex delegate: fails on any Select TF op
    sigs = interp.get_signature_list()
    assert sorted(sigs) == ["forward", "infer", "restore", "save", "train"]
    assert sorted(sigs["train"]["inputs"]) == ["labels", "x"] and sorted(sigs["train"]["outputs"]) == [
        "grad_input",
        "loss",
    ]
    out = interp.get_signature_runner("train")(
        x=np.random.rand(8, 1, 8, 8).astype(np.float32), labels=np.arange(8, dtype=np.int32)
    )
    assert out["grad_input"].shape == (8, 1, 8, 8) and np.isfinite(out["loss"])
    assert meta["batch_size"] == 8 and meta["state_size"] == sum(e["size"] for e in meta["state"])


def test_builtin_variant_refuses_what_it_cannot_train() -> None:
    with pytest.raises(ExportError, match=r"'act2' \(GELU\).*builtin-ops"):
        tflite_model_bytes(
            layer_graph(fx.symbolic_trace(Zoo(nn.GELU)), (8, 1, 8, 8)), is_last=True, variant="builtin", batch_size=8
        )
    overlapping = fx.symbolic_trace(nn.Sequential(nn.MaxPool2d(3, stride=1)))
    with pytest.raises(ExportError, match="kernel == stride"):
        tflite_model_bytes(layer_graph(overlapping, (8, 1, 8, 8)), is_last=True, variant="builtin", batch_size=8)
    flex, _ = tflite_model_bytes(layer_graph(overlapping, (8, 1, 8, 8)), is_last=False, variant="flex")
    assert flex  # the flex variant differentiates any MaxPool2d


def test_export_errors_for_bad_options() -> None:
    graph = layer_graph(fx.symbolic_trace(mlp()), (2, 1, 8, 8))
    with pytest.raises(ExportError, match="unknown optimizer 'lbfgs'"):
        tflite_model_bytes(graph, is_last=True, optimizer={"name": "lbfgs"})
    with pytest.raises(ExportError, match="fixed batch size"):
        tflite_model_bytes(graph, is_last=True, variant="builtin", batch_size=None)
    with pytest.raises(ExportError, match="invalid optimizer settings"):
        tflite_model_bytes(graph, is_last=True, optimizer={"name": "sgd", "lr": -1.0})


def test_cli_exports_both_variants_into_the_bundle(tmp_path: Path) -> None:
    part = partition(mlp(), ["relu1", "relu2"], torch.zeros(2, 1, 8, 8))
    source = SourceSpec(file_name="model.pt", sha256="0" * 64, kind="state_dict")
    b = write_bundle(part, tmp_path / "b", source=source, optimizer=OptimizerSpec(name="sgd", lr=0.05, momentum=0.9))
    assert main(["export", str(b.path), "--format", "tflite", "--batch-size", "4"]) == 0
    bundle = load_bundle(b.path)
    assert bundle.manifest.exports["tflite"]["batch_size"] == 4
    for spec in bundle.manifest.device_segments:
        arts = spec.artifacts["tflite"]
        assert set(arts) == {"flex", "builtin", "meta"}
        metas = json.loads(bundle.file(arts["meta"]).read_text())["variants"]
        assert metas["builtin"]["batch_size"] == 4 and metas["flex"]["batch_size"] is None
        assert metas["flex"]["optimizer"]["momentum"] == 0.9 and metas["flex"]["is_last"] == spec.is_last
