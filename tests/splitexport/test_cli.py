"""The command line: the users' flows and their error messages (exit 2, nothing half-written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitexport._cli import main
from splitexport.models import resnet_cnn

ARCH = ["--arch", "splitexport.models:resnet_cnn", "--input-shape", "1,1,8,8"]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(resnet_cnn().state_dict(), path)
    return path


def test_inspect_lists_cut_points(model_file: Path, capsys) -> None:
    assert main(["inspect", str(model_file), *ARCH]) == 0
    out = capsys.readouterr().out
    assert "layer2" in out and "32x4x4" in out and "layer1.conv1 " not in out


def test_partition_and_simulate(model_file: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    assert main(["partition", str(model_file), "--cut", "layer1", "--cut", "layer3", *ARCH, "-o", str(bundle)]) == 0
    assert (bundle / "manifest.json").is_file()
    out_dir = tmp_path / "results"
    assert main(["simulate", str(bundle), "--epochs", "1", "--out", str(out_dir), "--no-progress"]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["max_weight_difference"] <= 1e-5
    assert [r["name"] for r in metrics["runs"]] == ["split (torch)", "monolithic"]
    assert (out_dir / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("cuts", "message"),
    [
        (["layer9"], "no layer named 'layer9'"),
        (["layer2.conv1"], "tensors cross the cut"),
        (["layer3", "layer1"], "cuts out of order"),
    ],
)
def test_partition_errors(model_file: Path, tmp_path: Path, capsys, cuts, message) -> None:
    args = [a for c in cuts for a in ("--cut", c)]
    assert main(["partition", str(model_file), *args, *ARCH, "-o", str(tmp_path / "b")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert not any(p.name.startswith(".b") for p in tmp_path.iterdir())


def test_untraceable_model(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "dyn_models.py").write_text(
        "import torch\n"
        "class Dyn(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0: x = -x\n"
        "        return self.fc(x.flatten(1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import dyn_models

    torch.save(dyn_models.Dyn().state_dict(), tmp_path / "dyn.pt")
    code = main(["partition", str(tmp_path / "dyn.pt"), "--arch", "dyn_models:Dyn", "--input-shape", "1,1,8,8",
                 "--cut", "fc", "-o", str(tmp_path / "b")])
    assert code == 2
    assert "could not trace" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_pickle_without_trust(tmp_path: Path, capsys) -> None:
    torch.save(resnet_cnn(), tmp_path / "whole.pt")
    assert main(["inspect", str(tmp_path / "whole.pt"), "--input-shape", "1,1,8,8"]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "runs code" in err
    assert main(["inspect", str(tmp_path / "whole.pt"), "--input-shape", "1,1,8,8", "--trust-pickle"]) == 0


def test_tampered_bundle(model_file: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    assert main(["partition", str(model_file), "--cut", "layer2", *ARCH, "-o", str(bundle)]) == 0
    with open(bundle / "torch" / "A.pt", "ab") as f:
        f.write(b"x")
    assert main(["simulate", str(bundle), "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert "torch/A.pt" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_input_shape(model_file: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(model_file), "--arch", "splitexport.models:resnet_cnn", "--input-shape", "a,b"])
    assert exc.value.code == 2
    assert "--input-shape" in capsys.readouterr().err


def test_export_without_its_exporter_is_a_clear_error(model_file: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    bundle = tmp_path / "bundle"
    assert main(["partition", str(model_file), "--cut", "layer2", *ARCH, "-o", str(bundle)]) == 0
    before = (bundle / "manifest.json").read_text()
    monkeypatch.setitem(sys.modules, "splitexport.export._onnx", None)  # as if the extra were missing
    assert main(["export", str(bundle), "--format", "onnx"]) == 2
    assert "onnx exporter is not available" in capsys.readouterr().err
    assert (bundle / "manifest.json").read_text() == before
