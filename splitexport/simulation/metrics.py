"""What a simulated run consumed: bytes on the wire, FLOPs per segment step, and AdaSplit's C3-Score."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._torch_segment import eager_execution

C3_TEMPERATURE = 8.0
"""AdaSplit's C3-Score leaves the temperature T unstated; T = 8 reproduces its Tables 1-2 to +-0.01."""

TRAIN_FLOPS_FACTOR = 3
"""Training FLOPs per sample ~ 3x forward (forward + backward for inputs and weights)."""


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` on the wire: float tensors as float32, others at their own width."""
    return t.numel() * (4 if t.is_floating_point() else t.element_size())


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(tensor_bytes(t) for t in state.values())


def forward_flops(module: nn.Module, sample: torch.Tensor) -> int:
    """Forward FLOPs of ``module`` per sample (counted on a batch of 2 in eval mode, no state change)."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, eager_execution():
            module(sample.expand(2, *sample.shape[1:]).contiguous())
    finally:
        module.train(was)
    return counter.get_total_flops() // 2


def c3_score(accuracy: float, bandwidth: float, compute: float, max_bandwidth: float, max_compute: float,
             temperature: float = C3_TEMPERATURE) -> float:
    """AdaSplit's C3-Score: ``(A / 100%) * exp(-(B / B_max + C / C_max) / T)`` (accuracy as a fraction)."""
    b = bandwidth / max_bandwidth if max_bandwidth > 0 else 0.0
    c = compute / max_compute if max_compute > 0 else 0.0
    return accuracy * math.exp(-(b + c) / temperature)


@dataclass
class Usage:
    """What one client (or the whole run) consumed."""

    bytes_up: int = 0
    bytes_down: int = 0
    device_flops: int = 0
    server_flops: int = 0

    def add(self, other: Usage) -> None:
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.device_flops += other.device_flops
        self.server_flops += other.server_flops


@dataclass
class Ledger:
    """The run's accounting: each client's usage, the total, and the bytes the server sent.

    A client's download counts for that client; the server's upload counts each distinct tensor it sent
    once (a SplitAvg gradient or a FedAvg mean broadcast to several clients is one send).
    """

    per_client: dict[str, Usage] = field(default_factory=dict)
    total: Usage = field(default_factory=Usage)
    server_down: int = 0

    def count(self, client: str, *, up: Iterable[torch.Tensor] = (), down: Iterable[torch.Tensor] = (),
              device_flops: int = 0, server_flops: int = 0) -> None:
        u = Usage(sum(map(tensor_bytes, up)), sum(map(tensor_bytes, down)), device_flops, server_flops)
        self.per_client.setdefault(client, Usage()).add(u)
        self.total.add(u)

    def server_sent(self, *tensors: torch.Tensor) -> None:
        self.server_down += sum(map(tensor_bytes, tensors))

    @property
    def bytes(self) -> int:
        """Bytes over the network so far: every upload plus what the server sent."""
        return self.total.bytes_up + self.server_down
