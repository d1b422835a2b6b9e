"""AdaSplit's supervised NT-Xent against a direct loop over eq. 5 (averaged per anchor)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from splitexport.strategies import supervised_nt_xent


def _reference(q: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    q = F.normalize(q, dim=1)
    per_anchor = []
    for i in range(len(q)):
        denom = sum(math.exp(float(q[i] @ q[j]) / tau) for j in range(len(q)) if j != i)
        pos = [j for j in range(len(q)) if j != i and y[j] == y[i]]
        if pos:
            per_anchor.append(sum(-math.log(math.exp(float(q[i] @ q[j]) / tau) / denom) for j in pos) / len(pos))
    return sum(per_anchor) / len(per_anchor)


def test_matches_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    q, y = torch.randn(10, 5, generator=gen), torch.tensor([0, 1, 0, 2, 1, 1, 3, 0, 2, 4])
    assert float(supervised_nt_xent(q, y, tau=0.5)) == pytest.approx(_reference(q, y, 0.5), rel=1e-5)


def test_lower_when_classes_cluster() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    clustered = F.one_hot(y, 3).float() + 0.01 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    scattered = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    assert float(supervised_nt_xent(clustered, y)) < float(supervised_nt_xent(scattered, y))
    assert float(supervised_nt_xent(torch.randn(3, 4), torch.tensor([0, 1, 2]))) == 0.0  # no positive pairs
