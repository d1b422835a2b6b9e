"""One configuration source: the strategies' ``Params`` models give the simulate/serve flags, the server settings
and the harness's keyword arguments; a new strategy is one class."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
from pydantic import Field

from server import ServerSettings
from splitexport import SplitExportError, load_dataset
from splitexport._cli import build_parser
from splitexport.simulation import simulate_clients
from splitexport.strategies import (
    PSL,
    STRATEGIES,
    Hyperparameters,
    StrategyConfig,
    hyperparameter_fields,
    make_strategy,
)

from .conftest import server_segment


class ScaledParams(Hyperparameters):
    server_scale: float = Field(1.0, gt=0, description="server lr = client lr * server_scale")


class ScaledPSL(PSL):
    """A strategy written as one class: PSL with the server's learning rate scaled by its own hyperparameter."""

    name = "scaled"
    Params: ClassVar[type[Hyperparameters]] = ScaledParams
    params: ScaledParams

    def server_lr(self) -> float:
        return self.config.client_lr * self.params.server_scale


@pytest.fixture
def scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STRATEGIES, "scaled", ScaledPSL)


def test_flags_and_settings_have_the_models_defaults() -> None:
    fields = hyperparameter_fields()
    assert set(fields) == {"alpha", "phi", "phase_rounds", "kappa", "eta", "lam", "gamma"}
    assert fields["phi"].strategies == ("sglr",) and fields["kappa"].strategies == ("adasplit",)
    settings = ServerSettings(bundle="b")  # type: ignore[arg-type]
    for command in ("simulate", "serve"):
        args = build_parser().parse_args([command, "b"])
        assert {k: getattr(args, k) for k in fields} == dict.fromkeys(fields)  # unset: the models' defaults apply
    assert {k: getattr(settings, k) for k in fields} == {k: h.field.default for k, h in fields.items()}
    assert (settings.total_rounds, settings.strategy_seed) == (10, 0) == (
        StrategyConfig.model_fields["total_rounds"].default, StrategyConfig.model_fields["seed"].default)
    assert build_parser().parse_args(["simulate", "b"]).rounds == 10
    config = ServerSettings(bundle="b", num_clients=3, phi=0.25).strategy_config(0.1)  # type: ignore[arg-type]
    assert (config.num_clients, config.client_lr, config.hyperparameters["phi"]) == (3, 0.1, 0.25)


def test_a_strategy_in_one_class_gets_flags_and_runs(scaled: None, single_bundle) -> None:
    args = build_parser().parse_args(["simulate", "b", "--strategy", "scaled", "--server-scale", "3"])
    assert (args.strategy, args.server_scale) == ("scaled", 3.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "b", "--server-scale", "0"])
    strategy = make_strategy("scaled", server_segment(single_bundle),
                             StrategyConfig(num_clients=2, client_lr=0.05, server_scale=3.0))
    assert strategy.server is not None
    assert [g["lr"] for g in strategy.server.optimizer.param_groups] == [pytest.approx(0.15)]
    digits = load_dataset("digits")
    small = dataclasses.replace(digits, x_train=digits.x_train[:64], y_train=digits.y_train[:64],
                                x_test=digits.x_test[:32], y_test=digits.y_test[:32])
    run = simulate_clients(single_bundle, strategy="scaled", clients=2, rounds=1, batch_size=16, dataset=small,
                           progress=False, server_scale=3.0)
    assert run.config["server_scale"] == 3.0 and run.per_client["client00"].bytes_down > 0


def test_unknown_or_out_of_range_hyperparameters_are_refused(single_bundle) -> None:
    with pytest.raises(ValueError, match="unknown hyperparameter alhpa"):
        make_strategy("sglr", server_segment(single_bundle), StrategyConfig(num_clients=2, client_lr=0.05, alhpa=1))
    with pytest.raises(ValueError, match="phi"):
        make_strategy("sglr", server_segment(single_bundle), StrategyConfig(num_clients=2, client_lr=0.05, phi=2))
    with pytest.raises(SplitExportError, match="unknown hyperparameter alhpa"):
        simulate_clients(single_bundle, strategy="psl", clients=2, rounds=1, progress=False, alhpa=1.0)
    with pytest.raises(SplitExportError, match="strategy 'adasplit': eta: Input should be greater than 0"):
        simulate_clients(single_bundle, strategy="adasplit", clients=2, rounds=1, progress=False, eta=0.0)
