"""The privacy defences (NoPeek, activation noise): the distance correlation, the exactness of the split update
with a defence, the manifest, the CLI's checks, and the formats that refuse them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from splitexport import (
    Dataset,
    ExportError,
    MonolithicModel,
    OptimizerSpec,
    SourceSpec,
    fit,
    load_bundle,
    max_abs_difference,
    named_state,
    partition,
    torch_split_model,
    write_bundle,
)
from splitexport._cli import main
from splitexport._manifest import DefenceSpec
from splitexport.defence import Defence, distance_correlation
from splitexport.models import mlp
from splitexport.simulation import simulate

SPECS = {"nopeek": DefenceSpec(nopeek=0.5), "noise": DefenceSpec(activation_noise=0.3),
         "both": DefenceSpec(nopeek=1.0, activation_noise=0.1)}


def _reference_dcor(x: torch.Tensor, z: torch.Tensor) -> float:
    """Szekely's sample distance correlation in float64 with torch.cdist (independent of the implementation)."""
    def centred(t: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(t.flatten(1).double(), t.flatten(1).double())
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
    a, b = centred(x), centred(z)
    return float(((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt()).sqrt())


def test_distance_correlation_on_known_cases() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(distance_correlation(x, 3 * x.flatten(1) + 1)) == pytest.approx(1.0, abs=1e-6)
    z = torch.randn(32, 5, generator=g)
    assert float(distance_correlation(x, z)) == pytest.approx(_reference_dcor(x, z), abs=1e-6)
    u, v = torch.randn(256, 3, generator=g), torch.randn(256, 2, generator=g)  # few dims: little small-sample bias
    independent, squares = float(distance_correlation(u, v)), float(distance_correlation(u, u[:, :2] ** 2))
    assert independent < 0.2 and squares > independent + 0.2  # uncorrelated but dependent: dCor sees it
    z.requires_grad_(True)
    distance_correlation(x, z).backward()  # the zero diagonal of the distance matrix must not give NaN
    assert z.grad is not None and bool(torch.isfinite(z.grad).all()) and float(z.grad.abs().sum()) > 0
    one = torch.rand(1, 5, generator=g, requires_grad=True)
    distance_correlation(x[:1], one).backward()  # a batch of one: a constant, no gradient (as in the ONNX graph)
    assert one.grad is not None and float(one.grad.abs().sum()) == 0.0
    dead = torch.zeros(32, 5)  # dead ReLUs: identical rows (zero distances everywhere, zero variance)
    dead[:4] = torch.rand(4, 5, generator=g)
    for out in (dead, torch.zeros(32, 5)):
        out.requires_grad_(True)
        value = distance_correlation(x, out)
        value.backward()
        assert out.grad is not None and bool(torch.isfinite(out.grad).all()) and bool(torch.isfinite(value))


def _subset(digits: Dataset, n: int = 256) -> Dataset:
    return Dataset("digits-subset", digits.x_train[:n], digits.y_train[:n], digits.x_test[:64], digits.y_test[:64], 10)


@pytest.mark.parametrize("kind", list(SPECS))
def test_split_with_a_defence_equals_monolithic_with_the_same_terms(kind: str, digits: Dataset) -> None:
    """Split training with NoPeek / noise on A == one model trained on label loss + W dCor with the same noise."""
    spec, data = SPECS[kind], _subset(digits, 128)
    torch.manual_seed(0)
    part = partition(mlp(), ["relu1"], torch.zeros(1, 1, 8, 8))
    opt = OptimizerSpec(name="sgd", lr=0.05, momentum=0.9)
    runs = {}
    for name, defended in (("split", True), ("mono", True), ("plain", False)):
        mods = [copy.deepcopy(s.module) for s in part.segments]
        defence = Defence(spec, seed=0) if defended else None
        model = torch_split_model(mods, opt, defence=defence) if name == "split" else \
            MonolithicModel(torch.nn.Sequential(*mods), opt, defence=defence)
        fit(model, data, name=name, epochs=1, batch_size=32, progress=False)  # type: ignore[arg-type]
        runs[name] = named_state(mods)
    diff, where = max_abs_difference(runs["split"], runs["mono"])
    print(f"{kind}: |split - monolithic| {diff:.3g} ({where})")
    if spec.nopeek == 0:
        assert diff == 0.0, where  # the noise is an exact shift of the activation: bit for bit
    else:
        assert diff < 1e-7, where  # measured 1.5e-8: float32 rounding of the two gradients' sum at A's output
    assert max_abs_difference(runs["plain"], runs["mono"])[0] > 1e-3  # the defence does change the training


def test_the_noise_goes_out_and_the_penalty_changes_only_a() -> None:
    torch.manual_seed(0)
    part = partition(mlp(), ["relu1"], torch.zeros(1, 1, 8, 8))
    x = torch.rand(8, 1, 8, 8)
    split = torch_split_model([copy.deepcopy(s.module) for s in part.segments], OptimizerSpec(),
                              defence=Defence(DefenceSpec(activation_noise=0.5), seed=3))
    sent = split.runners[0].forward(x)
    clean = part.segments[0].module(x).detach()
    expected = clean + 0.5 * torch.from_numpy(
        __import__("numpy").random.default_rng(3).standard_normal(tuple(clean.shape), dtype="float32"))
    assert torch.equal(sent, expected)
    assert torch.equal(split.runners[0].evaluate(x), clean)  # no noise outside training


def _bundle(tmp_path: Path, spec: DefenceSpec, name: str = "b") -> Path:
    torch.manual_seed(0)
    part = partition(mlp(), ["relu1"], torch.zeros(1, 1, 8, 8))
    write_bundle(part, tmp_path / name, source=SourceSpec(file_name="mlp.pt", sha256="0" * 64, kind="test"),
                 optimizer=OptimizerSpec(name="sgd", lr=0.05), defence=spec)
    return tmp_path / name


def test_simulate_applies_the_recorded_defence(tmp_path: Path, digits: Dataset) -> None:
    data = _subset(digits, 128)
    kw = {"dataset": data, "epochs": 1, "batch_size": 32, "progress": False, "log": None}
    defended = simulate(load_bundle(_bundle(tmp_path, SPECS["both"], "d")), **kw)  # type: ignore[arg-type]
    plain = simulate(load_bundle(_bundle(tmp_path, DefenceSpec(), "p")), **kw)  # type: ignore[arg-type]
    assert defended.max_weight_difference < 1e-7 and plain.max_weight_difference == 0.0
    assert defended.histories[0].epochs[0].train_loss != plain.histories[0].epochs[0].train_loss


def test_partition_records_the_defence_and_refuses_bad_values(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    torch.save(mlp().state_dict(), tmp_path / "mlp.pt")
    base = ["partition", str(tmp_path / "mlp.pt"), "--arch", "splitexport.models:mlp", "--input-shape", "1,1,8,8",
            "--cut", "relu1"]
    assert main([*base, "-o", str(tmp_path / "b"), "--nopeek", "0.5", "--activation-noise", "0.1"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["defence"] == {"nopeek": 0.5, "activation_noise": 0.1}
    assert load_bundle(tmp_path / "b").manifest.defence == DefenceSpec(nopeek=0.5, activation_noise=0.1)
    capsys.readouterr()
    for flag, value in (("--nopeek", "-1"), ("--activation-noise", "-0.1"), ("--nopeek", "nan"),
                        ("--activation-noise", "inf")):
        with pytest.raises(SystemExit) as exc:
            main([*base, "-o", str(tmp_path / "bad"), flag, value])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and flag in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_nopeek_on_token_ids_is_refused(tmp_path: Path, capsys) -> None:
    from tests.zoo import transformer

    torch.save(transformer().state_dict(), tmp_path / "t.pt")
    rc = main(["partition", str(tmp_path / "t.pt"), "--arch", "tests.zoo:transformer", "--input-shape", "1,16",
               "--input-dtype", "int64", "--cut", "enc1", "-o", str(tmp_path / "b"), "--nopeek", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--nopeek needs float inputs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_multi_client_simulation_refuses_a_defended_bundle(tmp_path: Path) -> None:
    from splitexport import SplitExportError
    from splitexport.simulation import simulate_clients

    with pytest.raises(SplitExportError, match="does not apply the bundle's defence"):
        simulate_clients(load_bundle(_bundle(tmp_path, SPECS["nopeek"])), strategy="sfl", clients=2, rounds=1,
                         progress=False)


@pytest.mark.parametrize("fmt", ["tfjs", "tflite"])
def test_tfjs_and_tflite_refuse_a_defended_bundle(tmp_path: Path, fmt: str) -> None:
    from splitexport.export import export

    path = _bundle(tmp_path, SPECS["noise"])
    with pytest.raises(ExportError, match="exported to ONNX Runtime only"):
        export(path, fmt)  # type: ignore[arg-type]
    assert fmt not in load_bundle(path).manifest.exports
