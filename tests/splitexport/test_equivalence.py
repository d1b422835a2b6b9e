"""Split training equals monolithic training weight by weight (and the check can fail)."""

from __future__ import annotations

import copy

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
from splitexport._data import batch_indices
from splitexport.models import mlp, resnet_cnn

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
    diff, where = train_both(digits, model_name, split, OPTIMIZERS[opt])
    print(f"{model_name} {split} {opt}: max |dw| = {diff:.3e} at {where}")
    assert diff <= TOL, f"{where} differs by {diff}"


@pytest.mark.parametrize(
    "rule", [AuxLossRule(sign=-1.0), AuxLossRule(scale=1.0)], ids=["t=out+g", "sum-mse-without-half"]
)
@pytest.mark.parametrize("model_name", ["resnet", "mlp"])
def test_seed_variants_fail_the_check(digits, model_name, rule) -> None:
    diff, where = train_both(digits, model_name, "double", OPTIMIZERS["sgd"], rule)
    assert diff > 100 * TOL, f"wrong rule {rule} passed the equivalence check ({diff} at {where})"
