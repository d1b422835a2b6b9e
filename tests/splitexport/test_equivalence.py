"""Split training equals monolithic training weight by weight (and the check can fail)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from splitexport import (
    EXACT_RULE,
    AuxLossRule,
    MonolithicModel,
    OptimizerSpec,
    max_abs_difference,
    named_state,
    partition,
    torch_split_model,
)
from splitexport.models import mlp, resnet_cnn
from splitexport.simulation.data import batch_indices
from tests.tf_reference import max_diff, max_diff_where, max_rel_diff

STEPS = 50
TOL = 1e-5
OPTIMIZERS = {
    "sgd": OptimizerSpec(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": OptimizerSpec(name="adam", lr=1e-3, weight_decay=1e-4),
}
CUTS = {
    ("resnet", "single"): ["layer2"],
    ("resnet", "double"): ["layer1", "layer3"],
    ("mlp", "single"): ["relu1"],
    ("mlp", "double"): ["relu1", "relu2"],
}
FACTORIES = {"resnet": resnet_cnn, "mlp": mlp}


def train_both(digits, model_name: str, split: str, opt: OptimizerSpec, rule: AuxLossRule = EXACT_RULE):
    torch.manual_seed(0)
    model = FACTORIES[model_name]()
    part = partition(model, CUTS[(model_name, split)], digits.x_train[:2])
    mono = MonolithicModel(copy.deepcopy(model), opt)
    split_model = torch_split_model([s.module for s in part.segments], opt, rule=rule)
    steps = 0
    epoch = 0
    while steps < STEPS:
        for idx in batch_indices(len(digits.x_train), 32, seed=0, epoch=epoch):
            split_model.step(digits.x_train[idx], digits.y_train[idx])
            mono.step(digits.x_train[idx], digits.y_train[idx])
            steps += 1
            if steps == STEPS:
                break
        epoch += 1
    return max_abs_difference(named_state([s.module for s in part.segments]), mono.module.state_dict())


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("split", ["single", "double"])
@pytest.mark.parametrize("model_name", ["resnet", "mlp"])
def test_split_equals_monolithic(digits, model_name, split, opt) -> None:
    """Bit-identical, as the README claims (a tolerance would let the float32 form of the rule pass)."""
    diff, where = train_both(digits, model_name, split, OPTIMIZERS[opt])
    print(f"{model_name} {split} {opt}: max |dw| = {diff:.3e} at {where}")
    assert diff == 0.0, f"{where} differs by {diff}"


WRONG_RULES = {
    "t=out+g": AuxLossRule(sign=-1.0),  # SplitEasy paper
    "sum-mse-without-half": AuxLossRule(scale=1.0),  # SplitEasy code
    "float32": AuxLossRule(dtype=torch.float32),  # out - (out - g) in float32: loses g's low bits
}


@pytest.mark.parametrize("rule", sorted(WRONG_RULES))
@pytest.mark.parametrize("model_name", ["resnet", "mlp"])
def test_wrong_rules_fail_the_check(digits, model_name, rule) -> None:
    diff, where = train_both(digits, model_name, "double", OPTIMIZERS["sgd"], WRONG_RULES[rule])
    print(f"{model_name} double sgd, rule {rule}: max |dw| = {diff:.3e} at {where}")
    assert diff > 0.0, f"wrong rule {rule} passed the equivalence check ({diff} at {where})"
    if rule != "float32":  # the seeds' variants are far off; float32 only by rounding-sized amounts
        assert diff > 100 * TOL, f"wrong rule {rule} is within {diff} of monolithic training at {where}"


def _state() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.ones(2, 3), "b.bias": torch.zeros(3), "steps": torch.tensor(4)}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_non_finite_weights_never_count_as_equal(bad: float, side: str) -> None:
    a, b = _state(), _state()
    for s in ([a] if side == "left" else [b] if side == "right" else [a, b]):
        s["b.bias"][1] = bad
    assert max_abs_difference(a, b) == (math.inf, "b.bias")
    np_a = {k: v.numpy() for k, v in a.items()}
    np_b = {k: v.numpy() for k, v in b.items()}
    assert max_diff_where(np_a, np_b) == (math.inf, "b.bias")
    assert max_diff(np_a, np_b) == math.inf
    assert max_rel_diff(np_a, np_b, ["a.weight", "b.bias"]) == math.inf


def test_missing_tensor_or_shape_mismatch_is_infinitely_far() -> None:
    a, b = _state(), _state()
    del b["b.bias"]
    assert max_abs_difference(a, b) == (math.inf, "b.bias")
    assert max_diff({k: v.numpy() for k, v in a.items()}, {k: v.numpy() for k, v in b.items()}, ["b.bias"]) == math.inf
    b = _state()
    b["a.weight"] = torch.ones(3, 2)
    assert max_abs_difference(a, b) == (math.inf, "a.weight")
    assert max_diff_where({k: v.numpy() for k, v in a.items()}, {k: v.numpy() for k, v in b.items()}) == (
        math.inf, "a.weight")


def test_finite_difference_is_reported_where_it_occurs() -> None:
    a, b = _state(), _state()
    b["a.weight"][0, 1] += 0.25
    assert max_abs_difference(a, b) == (0.25, "a.weight")
    assert max_abs_difference(a, _state())[0] == 0.0
