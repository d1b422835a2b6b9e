"""Multi-client split learning strategies (server side, pure torch).

``make_strategy("sglr", server_segment, StrategyConfig(num_clients=10, client_lr=0.05, alpha=0.5, phi=0.5))``
"""

from .._torch_segment import TorchSegment
from ..protocol import DeviceState, ServerReply
from ._adasplit import AdaSplit
from ._base import Strategy, StrategyConfig, average_states
from ._fedavg import FedAvg
from ._masks import ClientMasks
from ._ntxent import projection_head, supervised_nt_xent
from ._psl import PSL
from ._reduce import CollectiveError, Collectives
from ._sfl import SplitFed
from ._sglr import SGLR
from ._ssl import SSL
from ._ucb import UCBOrchestrator

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (SSL, PSL, SplitFed, SGLR, AdaSplit, FedAvg)
}
"""Strategy classes by their command-line name."""


def make_strategy(name: str, server_segment: TorchSegment | None, config: StrategyConfig) -> Strategy:
    """The strategy ``name`` around ``server_segment`` (B; None only for FedAvg)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
    return cls(server_segment, config)


__all__ = [
    "PSL",
    "SGLR",
    "SSL",
    "STRATEGIES",
    "AdaSplit",
    "ClientMasks",
    "CollectiveError",
    "Collectives",
    "DeviceState",
    "FedAvg",
    "ServerReply",
    "SplitFed",
    "Strategy",
    "StrategyConfig",
    "UCBOrchestrator",
    "average_states",
    "make_strategy",
    "projection_head",
    "supervised_nt_xent",
]
