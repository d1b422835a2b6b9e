"""The package version: the installed distribution's metadata (pyproject.toml's ``version``, one source)."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def package_version() -> str:
    """The installed ``splitexport``'s version; in a source checkout that is not installed, pyproject.toml's."""
    try:
        return version("splitexport")
    except PackageNotFoundError:
        try:
            return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = package_version()
