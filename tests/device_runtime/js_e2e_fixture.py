"""Fixtures of the JS end-to-end test (device_runtime/js/test/e2e.test.js).

``python -m tests.device_runtime.js_e2e_fixture OUT`` writes, under OUT: MLP bundles for a double
split (A|B|C) and a single split (A|B), exported to TF.js and shipped with ``splitexport deploy``;
the digits train/test data as ``digits.safetensors`` (F32 images, I64 labels); a tokens file; and
``fixture.json`` with the paths.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from splitexport import OptimizerSpec, load_bundle, load_dataset
from splitexport._cli import run as cli
from tests.server.conftest import TOKEN, make_bundle

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


if __name__ == "__main__":
    print(json.dumps(write_fixture(Path(sys.argv[1]))))
