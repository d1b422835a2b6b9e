"""``python -m device_runtime train --runtime onnx`` against a real ``splitexport serve`` over loopback.

The user's flow from the README: partition (SGD with momentum), ``export --format onnx --optimizer sgd``
(ONNX Runtime trains the devices with plain SGD), ``deploy``, ``serve``, then the device client, which
shows per-epoch progress, the final accuracy and writes a PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from device_runtime._train import main
from splitexport import OptimizerSpec, load_bundle
from splitexport._cli import main as cli
from tests._support import TOKEN, ServerProcess, make_bundle

pytest.importorskip("onnxruntime.training")

EPOCHS = 8


def test_device_cli_trains_onnx_segments_of_a_deployed_bundle(tmp_path: Path, capsys) -> None:
    bundle = make_bundle(tmp_path / "bundle", "mlp", ["relu1", "relu2"], OptimizerSpec(lr=0.1, momentum=0.9))
    assert cli(["export", str(bundle), "--format", "onnx", "--optimizer", "sgd"]) == 0
    assert cli(["deploy", str(bundle), "--to", str(tmp_path / "app-assets")]) == 0
    deployed = load_bundle(tmp_path / "app-assets")
    assert deployed.manifest.scope == "device" and [s.name for s in deployed.manifest.device_segments] == ["A", "C"]
    assert all(s.artifacts["onnx"] for s in deployed.manifest.device_segments)
    assert not (tmp_path / "app-assets" / "torch" / "B.pt").exists()

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    server = ServerProcess(bundle, tmp_path / "state", tokens)
    server.start()
    try:
        capsys.readouterr()
        rc = main(["train", "--server", server.url, "--bundle", str(tmp_path / "app-assets"), "--token", TOKEN,
                   "--runtime", "onnx", "--epochs", str(EPOCHS), "--out", str(tmp_path / "out")])
        out = capsys.readouterr()
    finally:
        server.stop()
    assert rc == 0, out.err
    assert "device optimizer (ONNX artifacts): {'name': 'sgd', 'lr': 0.1" in out.out
    assert all(f"epoch {e}: train loss" in out.out for e in range(1, EPOCHS + 1))
    assert "split over HTTP (onnx)" in out.err  # the progress bar
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    acc = metrics["epochs"][-1]["test_accuracy"]
    print(f"\ndevice CLI, ORT A and C, MLP over HTTP: final test accuracy {acc:.4f}")
    assert f"final test accuracy {acc:.4f}" in out.out
    assert acc >= 0.90
    assert (tmp_path / "out" / "device_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = torch.load(tmp_path / "state" / "checkpoint.pt", weights_only=True)
    assert saved["applied_steps"] == EPOCHS * 43


def test_device_cli_without_onnx_artifacts_is_a_clear_error(tmp_path: Path, capsys) -> None:
    bundle = make_bundle(tmp_path / "bundle", "mlp", ["relu1", "relu2"], OptimizerSpec(lr=0.1))
    assert cli(["deploy", str(bundle), "--to", str(tmp_path / "app-assets")]) == 0
    rc = main(["train", "--server", "http://127.0.0.1:9", "--bundle", str(tmp_path / "app-assets"),
               "--runtime", "onnx", "--epochs", "1"])
    assert rc == 2
    assert "has no ONNX artifacts for segment A; run `splitexport export" in capsys.readouterr().err
