"""`splitexport simulate --device-runtime onnx`: ORT for A and C, torch for B, beside torch-only and monolithic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitexport._cli import main
from splitexport.models import mlp

ARCH = ["--arch", "splitexport.models:mlp", "--input-shape", "1,1,8,8"]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), model)
    out = tmp_path / "bundle"
    assert main(["partition", str(model), *ARCH, "--cut", "relu1", "--cut", "relu2", "-o", str(out)]) == 0
    return out


def test_simulate_with_ort_devices(bundle: Path, tmp_path: Path, capsys) -> None:
    results = tmp_path / "results"
    sim = [
        "simulate",
        str(bundle),
        "--device-runtime",
        "onnx",
        "--epochs",
        "1",
        "--lr",
        "0.3",
        "--no-progress",
        "--out",
        str(results),
    ]
    assert main(sim) == 2
    assert "splitexport export" in capsys.readouterr().err  # tells how to get the artifacts
    assert main(["export", str(bundle), "--format", "onnx"]) == 0
    assert main(sim) == 0
    metrics = json.loads((results / "metrics.json").read_text())
    runs = {r["name"]: r["epochs"][-1] for r in metrics["runs"]}
    assert list(runs) == ["split (torch)", "split (onnx devices)", "monolithic"]
    ort, mono = runs["split (onnx devices)"], runs["monolithic"]
    assert ort["test_loss"] == pytest.approx(mono["test_loss"], abs=1e-5)
    assert ort["test_accuracy"] == pytest.approx(mono["test_accuracy"])
    assert ort["test_accuracy"] > 0.15  # it learned something (chance is 0.1)
    # the ORT run's own weights against the monolithic run's (not the torch split's)
    diffs = metrics["weight_differences"]
    assert set(diffs) == {"split (torch)", "split (onnx devices)"}
    assert diffs["split (torch)"]["max"] == metrics["max_weight_difference"] == 0.0
    assert 0.0 < diffs["split (onnx devices)"]["max"] <= 1e-5
    out = capsys.readouterr().out
    assert "max |split (onnx devices) - monolithic|" in out and "max |split (torch) - monolithic|" in out


def test_simulate_refuses_an_optimizer_the_artifacts_were_not_built_for(bundle: Path, capsys) -> None:
    assert main(["export", str(bundle), "--format", "onnx"]) == 0
    code = main(
        ["simulate", str(bundle), "--device-runtime", "onnx", "--epochs", "1", "--no-progress", "--optimizer", "adamw"]
    )
    assert code == 2
    assert "re-export" in capsys.readouterr().err
