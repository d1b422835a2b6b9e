"""Fixtures of the JS test against replicated B (device_runtime/js/test/replicas.test.js).

``python -m tests.device_runtime.js_replicas_fixture OUT`` writes, under OUT: an MLP bundle (A | B | C), a
tokens file, ``batches.safetensors`` (each of the two devices' activation of B's input and gradient of B's
output for one PSL iteration) and ``fixture.json`` with the paths.

``python -m tests.device_runtime.js_replicas_fixture --compare RUN.json`` runs that iteration of PSL in one
process on both devices' batches and prints, as JSON, how far the JS devices' replies (B's outputs, the cut
gradients) and both replicas' B (their snapshots after the iteration) are from it, and whether the replicas'
B are bit-identical.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from splitexport import OptimizerSpec, max_abs_difference
from tests._support import TOKEN, make_bundle
from tests.server.test_strategies_http import activations, reference

CLIENTS = ["device0", "device1"]


def write_fixture(out: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(out / "bundle", "mlp", ["relu1", "relu2"], OptimizerSpec(lr=0.1, momentum=0.9))
    x = activations(bundle, CLIENTS, seed=3)
    ref = reference(bundle, "psl", num_clients=len(CLIENTS))
    outputs = ref.forward_round(x)  # only for the gradients' shapes
    gen = torch.Generator().manual_seed(4)
    tensors = {**{f"x_{c}": x[c].numpy() for c in CLIENTS},
               **{f"g_{c}": torch.randn(o.shape, generator=gen).numpy() for c, o in outputs.items()}}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "batches.safetensors"))
    (out / "tokens.txt").write_text(TOKEN + "\n")
    fixture: dict[str, object] = {"token": TOKEN, "tokens": str(out / "tokens.txt"), "bundle": str(bundle),
                                  "batches": str(out / "batches.safetensors"), "clients": CLIENTS}
    (out / "fixture.json").write_text(json.dumps(fixture, indent=2))
    return fixture


def _array(t: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(t["data"], dtype=torch.float32).reshape(t["shape"])


def compare(run: dict[str, Any]) -> dict[str, Any]:
    """``run``: the fixture's ``bundle`` and ``batches``, the server's ``state_dir`` and the JS devices' ``outputs``
    and ``grads`` (``{shape, data}`` per device)."""
    from safetensors.numpy import load_file

    bundle = Path(run["bundle"])
    batches = {k: torch.from_numpy(v) for k, v in load_file(run["batches"]).items()}
    ref = reference(bundle, "psl", num_clients=len(CLIENTS))
    out = ref.forward_round({c: batches[f"x_{c}"] for c in CLIENTS})
    back = ref.backward_round({c: batches[f"g_{c}"] for c in CLIENTS})
    replies = max(max(max_abs_difference({"o": _array(run["outputs"][c])}, {"o": out[c]})[0],
                      max_abs_difference({"g": _array(run["grads"][c])}, {"g": back[c]})[0]) for c in CLIENTS)
    snaps = [torch.load(Path(run["state_dir"]) / f"rank{r}" / "checkpoint.pt", weights_only=True)["module"]
             for r in range(2)]
    b, where = max_abs_difference(snaps[0], ref.server.module.state_dict())
    identical = snaps[0].keys() == snaps[1].keys() and all(torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[0])
    finite = [v if math.isfinite(v) else None for v in (replies, b)]  # JSON has no infinity: null never passes
    return {"replies": finite[0], "b": finite[1], "where": where, "identical": identical}


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        print(json.dumps(compare(json.loads(Path(sys.argv[2]).read_text()))))
    else:
        print(json.dumps(write_fixture(Path(sys.argv[1]))))
