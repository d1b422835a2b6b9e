"""The zoo's sequence models (transformer, GRU, LSTM classifiers) train on the device like torch.

Segments of the zoo's double cut (tests/zoo.py) in TFLite flex, the builtin variant's refusal
naming the layer, and TF.js: 20 steps, per step and free-running, within 1e-5 of torch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.splitexport.export.seq_zoo_cases import ZOO_CASES
from tests.splitexport.export.test_seq_ops import check_tfjs, check_tflite
from tests.tf_reference import Case
from tests.zoo_results import record


def _model_segment(case: Case) -> tuple[str, str]:
    model, seg = case.name.removeprefix("zoo_").rsplit("_", 1)
    return model, seg


@pytest.mark.parametrize("variant", ["flex", "builtin"])
@pytest.mark.parametrize("case", ZOO_CASES, ids=[c.name for c in ZOO_CASES])
def test_zoo_seq_tflite_matches_torch(case: Case, variant: str, tmp_path: Path) -> None:
    result = check_tflite(case, variant, tmp_path)
    record(*_model_segment(case)[:1], f"tflite_{variant}", result, segment=_model_segment(case)[1])


def test_zoo_seq_tfjs_matches_torch(tmp_path: Path) -> None:
    for name, value in check_tfjs(ZOO_CASES, tmp_path).items():
        model, seg = _model_segment(next(c for c in ZOO_CASES if c.name == name))
        record(model, "tfjs", value, segment=seg)
