"""The simulation harnesses (the ``sim`` extra): one split model beside its monolithic twin (``simulate``),
N simulated devices around a multi-client strategy (``simulate_clients``), the clients' data splits, the
traffic/compute metrics and C3-Score, and the figures."""

from .client_data import PARTITIONS, PartitionKind, partition_indices
from .metrics import C3_TEMPERATURE, Usage, c3_score
from .multiclient import MultiClientResult, RoundMetrics, ServerLink, simulate_clients, write_results
from .single import DEVICE_RUNTIMES, SimulationResult, simulate

__all__ = [
    "C3_TEMPERATURE",
    "DEVICE_RUNTIMES",
    "PARTITIONS",
    "MultiClientResult",
    "PartitionKind",
    "RoundMetrics",
    "ServerLink",
    "SimulationResult",
    "Usage",
    "c3_score",
    "partition_indices",
    "simulate",
    "simulate_clients",
    "write_results",
]
