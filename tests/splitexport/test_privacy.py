"""Leakage measurements of ``plan --attack``: the metrics on known cases, and the attacks on the example models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from splitexport import load_dataset
from splitexport._cli import main
from splitexport._privacy import auc, label_leakage_auc, measure, psnr, ssim
from splitexport.models import mlp

pytest.importorskip("onnxruntime.training")


def test_psnr_and_ssim_on_known_cases() -> None:
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x, 1.0) == math.inf and ssim(x, x, 1.0) == pytest.approx(1.0)
    assert psnr(x + 0.1, x, 1.0) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 on a range of 1
    assert psnr(x + 0.1, x, 2.0) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-4)
    noise = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert ssim(noise, x, 1.0) < 0.2 < ssim(x + 0.05 * noise, x, 1.0)
    assert ssim(x * 0.5, x, 1.0) < ssim(x * 0.9, x, 1.0) < 1.0


def test_label_leakage_auc_separates_informative_from_random_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (400,), generator=gen)
    informative = torch.nn.functional.one_hot(y, 10).float() + 0.1 * torch.randn(400, 10, generator=gen)
    assert label_leakage_auc(informative, y) > 0.95
    assert abs(label_leakage_auc(torch.randn(400, 10, generator=gen), y) - 0.5) < 0.05
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0


def test_inversion_leaks_less_after_a_deeper_cut_and_double_split_has_no_label_attack() -> None:
    torch.manual_seed(0)
    model, data = mlp(), load_dataset("digits")
    x, y = data.x_train[:600], data.y_train[:600]
    shallow = measure(model, ("fc1",), torch.zeros(1, 1, 8, 8), x, y)
    deep = measure(model, ("relu2",), torch.zeros(1, 1, 8, 8), x, y)
    assert shallow.psnr_db > deep.psnr_db + 2 and shallow.ssim is not None and deep.ssim is not None
    assert shallow.ssim > deep.ssim
    assert shallow.label_auc is not None and shallow.label_auc > 0.9  # an untrained model's gradients leak labels
    assert measure(model, ("relu1", "relu2"), torch.zeros(1, 1, 8, 8), x, y).label_auc is None


def test_plan_attack_columns_and_json(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    torch.save(mlp().state_dict(), tmp_path / "mlp.pt")
    assert main(["plan", str(tmp_path / "mlp.pt"), "--arch", "splitexport.models:mlp", "--input-shape", "1,1,8,8",
                 "--attack", "--attack-samples", "400", "--reps", "1", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "PSNR dB" in out and "labelAUC" in out
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["settings"]["attack_samples"] == 400
    for c in plan["candidates"]:
        leak = c["leakage"]
        assert 0 < leak["psnr_db"] < 60 and 0 < leak["ssim"] <= 1 and 0.5 <= leak["label_auc"] <= 1
        assert f"{leak['psnr_db']:.1f}" in out


def test_plan_attack_refuses_token_models(tmp_path: Path, capsys) -> None:
    from tests.zoo import transformer

    torch.save(transformer().state_dict(), tmp_path / "t.pt")
    rc = main(["plan", str(tmp_path / "t.pt"), "--arch", "tests.zoo:transformer", "--input-shape", "1,16",
               "--input-dtype", "int64", "--attack", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "token ids" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
