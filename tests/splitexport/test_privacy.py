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
    assert shallow.psnr_db is not None and deep.psnr_db is not None and shallow.psnr_db > deep.psnr_db + 2
    assert shallow.ssim is not None and deep.ssim is not None
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


def test_token_recovery_beats_the_majority_guess_after_a_shallow_cut_only() -> None:
    from tests.zoo import _text, transformer

    torch.manual_seed(0)
    model, (ids, y) = transformer(), _text(400, 0)
    shallow = measure(model, ("pos",), torch.zeros(1, 16, dtype=torch.long), ids, y, epochs=20)
    assert shallow.psnr_db is None and shallow.ssim is None
    assert shallow.token_accuracy is not None and shallow.token_baseline is not None
    assert shallow.token_baseline < 0.1 and shallow.token_accuracy > 0.9  # embeddings (+ position) are invertible
    pooled = measure(model, ("pool",), torch.zeros(1, 16, dtype=torch.long), ids, y, epochs=20)
    assert pooled.token_accuracy is not None and pooled.token_accuracy < shallow.token_accuracy - 0.5


class TinyText(torch.nn.Module):
    """Token ids (16) -> embeddings -> a linear layer per position -> mean -> 2 classes: few cuts, quick to plan."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.mix(self.embed(ids))).mean(1))


def tiny_text() -> torch.nn.Module:
    return TinyText()


def test_plan_attack_on_token_ids(tmp_path: Path, capsys) -> None:
    import numpy as np

    from tests.zoo import _text

    torch.manual_seed(0)
    torch.save(tiny_text().state_dict(), tmp_path / "t.pt")
    ids, y = _text(300, 0)
    np.savez(tmp_path / "text.npz", x=ids.numpy(), y=y.numpy())
    rc = main(["plan", str(tmp_path / "t.pt"), "--arch", "tests.splitexport.test_privacy:tiny_text", "--input-shape",
               "1,16", "--input-dtype", "int64", "--data", str(tmp_path / "text.npz"), "--attack", "--attack-samples",
               "300", "--reps", "1", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "tokenAcc" in out and "PSNR" not in out
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    leaks = {c["label"]: c["leakage"] for c in plan["candidates"]}
    for leak in leaks.values():
        assert 0 <= leak["token_baseline"] < 0.2 and 0 <= leak["token_accuracy"] <= 1 and leak["psnr_db"] is None
        assert f"{leak['token_accuracy']:.3f}" in out
    assert leaks["embed"]["token_accuracy"] > 0.9  # the cut right after the embedding gives the tokens away
