"""Fixtures of the JS end-to-end test (device_runtime/js/test/e2e.test.js).

``python -m tests.device_runtime.js_e2e_fixture OUT`` writes, under OUT: MLP bundles for a double
split (A|B|C) and a single split (A|B), exported to TF.js and shipped with ``splitexport deploy``;
the digits train/test data as ``digits.safetensors`` (F32 images, I64 labels); a tokens file; and
``fixture.json`` with the paths.

``python -m tests.device_runtime.js_e2e_fixture --compare RUN.json`` replays a JS run over HTTP
(float32 transport) in process in torch (same initial weights, batches, optimizer) and prints, as
JSON, the largest difference of the JS device weights from torch's.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from splitexport import OptimizerSpec, SplitModel, TorchSegment, load_bundle, load_dataset
from splitexport._cli import run as cli
from splitexport.export._tfjs import META_FILE
from tests._support import TOKEN, make_bundle
from tests.tf_reference import max_diff_where, tf_state

SPLITS = {"double": ["relu1", "relu2"], "single": ["relu1"]}


def write_fixture(out: Path) -> dict[str, object]:
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / "digits.safetensors"
    fixture: dict[str, object] = {"token": TOKEN, "tokens": str(out / "tokens.txt"), "data": str(data_file)}
    (out / "tokens.txt").write_text(TOKEN + "\n")
    for split, cuts in SPLITS.items():
        bundle = make_bundle(out / split / "bundle", "mlp", cuts, OptimizerSpec(lr=0.05, momentum=0.9))
        cli(["export", str(bundle), "--format", "tfjs"])
        cli(["deploy", str(bundle), "--to", str(out / split / "app-assets")])
        deployed = load_bundle(out / split / "app-assets")
        dirs = {s.name: deployed.file(s.artifacts["tfjs"]["model"]).parent for s in deployed.manifest.device_segments}
        fixture[split] = {"bundle": str(bundle), "segments": {k: str(v) for k, v in dirs.items()}}
    data = load_dataset("digits")
    save_file({k: np.ascontiguousarray(getattr(data, k).numpy()) for k in ("x_train", "y_train", "x_test", "y_test")},
              str(data_file))
    (out / "fixture.json").write_text(json.dumps(fixture, indent=2))
    return fixture


def compare(run: dict[str, Any]) -> dict[str, Any]:
    """Replay ``run`` (bundle, segment dirs, batches, JS weights) in torch; the JS weights' largest difference."""
    bundle = load_bundle(run["bundle"])
    m = bundle.manifest
    runners = [TorchSegment(bundle.torch_segment(s.name), m.optimizer, loss=m.loss.kind, input_grad=s.index > 0)
               for s in m.segments]
    model = SplitModel(runners)
    data = load_dataset("digits")
    for idx in run["batches"]:
        i = torch.tensor(idx, dtype=torch.long)
        model.step(data.x_train[i], data.y_train[i])
    worst, where = 0.0, ""
    for r, s in zip(runners, m.segments, strict=True):
        if s.role != "device":
            continue
        names = json.loads((Path(run["segments"][s.name]) / META_FILE).read_text())["torch_names"]
        torch_state = {k: v.detach().numpy() for k, v in r.module.state_dict().items()}
        js = {k: np.asarray(v["data"], np.float32).reshape(v["shape"]) for k, v in run["weights"][s.name].items()}
        expected = tf_state(names, torch_state)
        d, w = max_diff_where(js, expected, sorted(expected))
        if d >= worst:
            worst, where = d, f"{s.name}/{w}"
    # JSON has no infinity: null stands for "NaN/Inf or mismatched" (never within a tolerance)
    return {"max_abs_difference": worst if math.isfinite(worst) else None, "where": where, "steps": len(run["batches"])}


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        print(json.dumps(compare(json.loads(Path(sys.argv[2]).read_text()))))
    else:
        print(json.dumps(write_fixture(Path(sys.argv[1]))))
