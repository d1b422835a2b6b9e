"""Client partitions of a dataset's training split: IID and non-IID (label shards), seeded."""

from __future__ import annotations

from typing import Literal

import torch

from .._errors import SplitExportError

PartitionKind = Literal["iid", "noniid"]
PARTITIONS: tuple[PartitionKind, ...] = ("iid", "noniid")


def partition_indices(
    labels: torch.Tensor, num_clients: int, kind: PartitionKind = "iid", *, seed: int = 0, shards_per_client: int = 2
) -> list[torch.Tensor]:
    """Training-sample indices per client.

    ``iid``: a seeded shuffle cut into ``num_clients`` near-equal parts. ``noniid``:
    McMahan et al.'s label shards: samples sorted by label (ties shuffled), cut into
    ``shards_per_client * num_clients`` equal shards, each client gets that many random
    shards, so most clients see only ``shards_per_client`` classes.
    """
    n = int(labels.shape[0])
    if num_clients < 1 or num_clients > n:
        raise SplitExportError(f"--clients must be between 1 and {n} for this dataset, got {num_clients}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "iid":
        order = torch.randperm(n, generator=gen)
        return [part.sort().values for part in order.tensor_split(num_clients)]
    if kind == "noniid":
        shuffled = torch.randperm(n, generator=gen)
        order = shuffled[torch.argsort(labels[shuffled], stable=True)]
        shards = order.tensor_split(shards_per_client * num_clients)
        assign = torch.randperm(len(shards), generator=gen).view(num_clients, shards_per_client)
        return [torch.cat([shards[int(s)] for s in row]).sort().values for row in assign]
    raise SplitExportError(f"unknown partition {kind!r}; choose from {', '.join(PARTITIONS)}")
