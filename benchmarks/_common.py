"""Shared by the benchmark scripts: the machine description (servers and bundles: :mod:`tests._support`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine(**extra: str) -> dict[str, str]:
    """CPU model, cores, Python, torch and platform, plus ``extra`` (library versions, settings)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), **extra}
