"""How long the server's body decoder takes on a hostile safetensors header (issue 13, item 1).

    python benchmarks/bench_safetensors_header.py [--tensors 150000] [--smoke]

A header naming ``--tensors`` empty F32 tensors (150,000: 9.5 MiB, under the 16 MiB body limit) is given
to ``server._wire.decode``, the function every tensor call runs on the event loop before anything else.
Prints the answer (a 413 ``header_too_large`` since the header bound; the parsed tensors before it) and
the time it took. Runs in well under a second with the bound.
"""

from __future__ import annotations

import argparse
import json
import struct
import time

from server._errors import APIError
from server._wire import decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=150_000)
    p.add_argument("--smoke", action="store_true", help="a 5,000-tensor header (CI: the script runs)")
    args = p.parse_args()
    if args.smoke:
        args.tensors = 5_000
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    header = json.dumps({f"t{i}": empty for i in range(args.tensors)}).encode()
    body = struct.pack("<Q", len(header)) + header
    t0 = time.perf_counter()
    try:
        answer = f"parsed {len(decode(body))} tensors"
    except APIError as exc:
        answer = f"{exc.status} {exc.code}"
    ms = (time.perf_counter() - t0) * 1000
    print(f"{len(body) / 2**20:.1f} MiB header, {args.tensors} tensors: {answer} in {ms:.1f} ms")


if __name__ == "__main__":
    main()
