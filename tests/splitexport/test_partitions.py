"""Client partitions: every training sample exactly once; non-IID clients see few classes."""

from __future__ import annotations

import pytest
import torch

from splitexport import SplitExportError
from splitexport.simulation import partition_indices


@pytest.mark.parametrize("kind", ["iid", "noniid"])
@pytest.mark.parametrize("clients", [1, 5, 20])
def test_partitions_cover_the_data_once(digits, kind: str, clients: int) -> None:
    parts = partition_indices(digits.y_train, clients, kind, seed=0)  # type: ignore[arg-type]
    assert len(parts) == clients
    joined = torch.cat(parts)
    assert torch.equal(joined.sort().values, torch.arange(len(digits.y_train)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2


def test_noniid_is_label_skewed_and_iid_is_not(digits) -> None:
    noniid = partition_indices(digits.y_train, 10, "noniid", seed=0)
    iid = partition_indices(digits.y_train, 10, "iid", seed=0)
    assert max(len(digits.y_train[p].unique()) for p in noniid) <= 4
    assert min(len(digits.y_train[p].unique()) for p in iid) == 10
    again = partition_indices(digits.y_train, 10, "noniid", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(noniid, again, strict=True))
    other = partition_indices(digits.y_train, 10, "noniid", seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(noniid, other, strict=True))


def test_bad_partition_requests(digits) -> None:
    with pytest.raises(SplitExportError, match="--clients"):
        partition_indices(digits.y_train, 0, "iid")
    with pytest.raises(SplitExportError, match="unknown partition"):
        partition_indices(digits.y_train, 2, "dirichlet")  # type: ignore[arg-type]
