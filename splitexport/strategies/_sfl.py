"""SplitFed (SFL-V1 flavour with one shared B): PSL plus FedAvg of the device segments after each round."""

from __future__ import annotations

from typing import ClassVar

from ._base import DeviceSync
from ._psl import PSL


class SplitFed(PSL):
    """PSL iterations; at the end of a round every client's device weights become their sample-weighted mean.

    Double split: A and C are both averaged (they live on the device).
    """

    name = "sfl"
    device_sync: ClassVar[DeviceSync] = "average"
