"""The zoo's sequence models (tests/zoo.py: transformer, GRU, LSTM classifiers) cut into device segments A and C.

Each case is one segment of the zoo's double cut (a whole-model case of :mod:`tests.tf_reference`), partitioned with a real example of the model's dtype (token ids for the transformer and
the LSTM).
"""

from __future__ import annotations

import functools

from torch import nn

from splitexport import partition
from tests.tf_reference import BATCH, Case
from tests.zoo import VOCAB, ZOO

MODELS = ("transformer", "gru", "lstm")


@functools.cache
def _segments(model: str) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    import torch

    z = ZOO[model]
    torch.manual_seed(0)
    part = partition(z.factory(), list(z.cuts["double"]), z.example(BATCH))
    return {s.name: (s.module, tuple(s.input_shape)) for s in part.segments}


def _factory(model: str, segment: str) -> nn.Module:
    return _segments(model)[segment][0]


ZOO_CASES: list[Case] = []
for _model in MODELS:
    _zoo = ZOO[_model]
    for _seg in ("A", "C"):
        _name = f"zoo_{_model}_{_seg}"
        _shape = _segments(_model)[_seg][1]
        ints = _seg == "A" and _zoo.dtype_name != "float32"
        ZOO_CASES.append(Case(_name, "", model=functools.partial(_factory, _model, _seg), input_shape=_shape,
                              is_last=_seg == "C", builtin=False, input_dtype=_zoo.dtype_name if ints else "float32",
                              vocab=VOCAB, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}))
