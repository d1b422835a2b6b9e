"""Parallel split learning (PSL): all clients at once, one B step over the concatenated batch."""

from __future__ import annotations

from typing import ClassVar

from ._base import DeviceSync, Strategy


class PSL(Strategy):
    """Every client of an iteration sends its activations together; B trains once on their concatenation.

    B's loss is ``sum_i delta_i L_i`` (``delta_i = n_i / sum n``, SGLR eq. 4); each
    client gets its own cut-layer gradient ``dL_i/d(a_i)`` (eq. 5) and keeps its
    own device weights. Double split: B's output is split back per client, each
    C computes its own loss, and B takes one aux-loss step on the concatenated,
    ``delta``-weighted gradients.
    """

    name = "psl"
    splits = frozenset({"single", "double"})
    device_sync: ClassVar[DeviceSync] = "independent"
    batches_server = True
