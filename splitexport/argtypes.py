"""Command-line argument types and a parser whose errors are one line (exit 2), for every CLI
(``splitexport`` and ``python -m device_runtime``).

The public home of ``_argtypes`` (the code lives there).
"""

from ._argtypes import (
    EXIT_USAGE,
    OneLineParser,
    existing_file,
    finite_float,
    fraction,
    http_url,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_fraction,
    positive_int,
    writable_dir,
)

__all__ = ["EXIT_USAGE", "OneLineParser", "existing_file", "finite_float", "fraction", "http_url",
           "non_negative_float", "non_negative_int", "port", "positive_float", "positive_fraction", "positive_int",
           "writable_dir"]
