"""``python -m splitexport.export.ops [--check]``: rewrite (or check) the op table in docs/ops.md."""

from __future__ import annotations

import sys

from . import REGISTRY  # noqa: F401 - loads every family
from ._docs import DOC, generated_section, render_section, update


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if generated_section(DOC.read_text() if DOC.exists() else "") != render_section():
            print(f"{DOC}: the op table is out of date; run python -m splitexport.export.ops", file=sys.stderr)
            return 1
        return 0
    print(f"{DOC}: {'updated' if update(DOC) else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
