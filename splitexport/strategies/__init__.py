"""Multi-client split learning strategies (both halves, pure torch): the server's ``Strategy`` and the device
procedure it declares.

``make_strategy("sglr", server_segment, StrategyConfig(num_clients=10, client_lr=0.05, alpha=0.5, phi=0.5))``

A new strategy is one module: a ``Strategy`` subclass with its ``name``, ``device`` and ``Params``, listed in
:data:`STRATEGIES` below; its hyperparameters become ``simulate``/``serve`` flags and server settings.
"""

from dataclasses import dataclass

from pydantic.fields import FieldInfo

from .._torch_segment import TorchSegment
from ..protocol import DeviceState, ServerReply
from ._adasplit import AdaSplit, AdaSplitParams
from ._base import Hyperparameters, Strategy, StrategyConfig, average_states
from ._devices import (
    Context,
    Device,
    FullModelClient,
    LocalLossClient,
    LossTally,
    Meter,
    SegmentNames,
    ServerLink,
    SplitClient,
)
from ._fedavg import FedAvg
from ._masks import ClientMasks
from ._ntxent import projection_head, supervised_nt_xent
from ._psl import PSL
from ._reduce import CollectiveError, Collectives
from ._sfl import SplitFed
from ._sglr import SGLR, SGLRParams
from ._ssl import SSL
from ._ucb import UCBOrchestrator

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (SSL, PSL, SplitFed, SGLR, AdaSplit, FedAvg)
}
"""Strategy classes by their command-line name."""


@dataclass(frozen=True)
class HyperparameterField:
    """One hyperparameter of the registered strategies: its pydantic field and the strategies that read it."""

    name: str
    field: FieldInfo
    strategies: tuple[str, ...]


def hyperparameter_fields() -> dict[str, HyperparameterField]:
    """Every registered strategy's hyperparameters by name, the one source of their defaults, bounds and help."""
    out: dict[str, HyperparameterField] = {}
    for cls in STRATEGIES.values():
        for name, info in cls.Params.model_fields.items():
            known = out.get(name)
            if known is not None and repr(known.field) != repr(info):
                raise TypeError(f"hyperparameter {name!r} is declared differently by {known.strategies} and {cls.name}")
            users = known.strategies if known is not None else ()
            out[name] = HyperparameterField(name, info, (*users, cls.name) if cls.name not in users else users)
    return out


def make_strategy(name: str, server_segment: TorchSegment | None, config: StrategyConfig) -> Strategy:
    """The strategy ``name`` around ``server_segment`` (B; None only for FedAvg)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
    unknown = sorted(set(config.hyperparameters) - set(hyperparameter_fields()))
    if unknown:
        raise ValueError(f"unknown hyperparameter {', '.join(unknown)}; the strategies have "
                         f"{', '.join(hyperparameter_fields())}")
    return cls(server_segment, config)


__all__ = [
    "PSL",
    "SGLR",
    "SSL",
    "STRATEGIES",
    "AdaSplit",
    "AdaSplitParams",
    "ClientMasks",
    "CollectiveError",
    "Collectives",
    "Context",
    "Device",
    "DeviceState",
    "FedAvg",
    "FullModelClient",
    "HyperparameterField",
    "Hyperparameters",
    "LocalLossClient",
    "LossTally",
    "Meter",
    "SGLRParams",
    "SegmentNames",
    "ServerLink",
    "ServerReply",
    "SplitClient",
    "SplitFed",
    "Strategy",
    "StrategyConfig",
    "UCBOrchestrator",
    "average_states",
    "hyperparameter_fields",
    "make_strategy",
    "projection_head",
    "supervised_nt_xent",
]
