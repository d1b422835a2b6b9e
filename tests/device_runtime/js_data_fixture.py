"""Data files, bundles and Python's preprocessed tensors for device_runtime/js/test/data.test.js.

``python -m tests.device_runtime.js_data_fixture OUT`` writes each case's data file and bundle under OUT and
``OUT/fixture.json``: per case the file, the bundle's manifest.json, the CSV target, and what
``splitexport.simulation.datafiles.load_data`` (the path simulate and the Python device take) makes of the file: the
train and test rows together (base64 float32 or int32, row-major), their labels and the shape.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitexport import LossSpec, SourceSpec, load_bundle, partition, write_bundle
from splitexport.models import MLP
from splitexport.simulation.datafiles import given_preprocess, load_data, parse_preprocess, preprocess_for

SRC = SourceSpec(file_name="m.pt", sha256="0" * 64, kind="state_dict")


def _bundle(out: Path, model: nn.Module, example: torch.Tensor, cut: str, *, loss: str = "cross_entropy",
            data: Path | None = None, target: str | None = None, given: list[str] | None = None) -> Path:
    part = partition(model, [cut], example)

    def pre(m):  # type: ignore[no-untyped-def]
        fitted = preprocess_for(data, m, target=target) if data is not None else None
        return given_preprocess(parse_preprocess(given), m, fitted) if given else fitted

    write_bundle(part, out, source=SRC, loss=LossSpec(kind=loss),  # type: ignore[arg-type]
                 preprocess=pre if data is not None or given else None)
    return out / "manifest.json"


def _b64(t: torch.Tensor) -> str:
    arr = t.numpy().astype(np.int32 if not t.is_floating_point() else np.float32)
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()


def _csv(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    animals = ["cat", "dog", "emu"]
    lines = ["a, b ,c,d,animal"]  # spaces in the header are stripped
    for i in range(60):
        v = rng.normal(size=4) * [1, 100, 0.01, 7] + [0, 1e3, 0.1, -3]
        cells = [f"{v[0]:.6g}", f'"{v[1]:.9f}"', f"{v[2]:.3e}", f" {float(v[3])!r} "]  # quoted, exponent, padded
        lines.append(",".join(cells) + f",{animals[i % 3]}")
        if i == 10:
            lines.append("")  # a blank line is skipped
    table = _csv(out / "animals.csv", "\r\n".join(lines) + "\r\n")
    sub = _csv(out / "two.csv", "\n".join([lines[0], *[ln for ln in lines[1:] if ln.endswith(("dog", "emu"))]]))
    table_manifest = _bundle(out / "table", MLP(3, 4, 8), torch.zeros(2, 4), "relu1", data=table, target="animal")
    reg_x = rng.normal(size=(40, 4)) * [3, 1, 50, 0.2]
    reg = _csv(out / "reg.csv", "\n".join(["p,q,r,s,price", *(",".join(f"{v:.5f}" for v in [*r, r @ [1, 2, 0.1, 5]])
                                                              for r in reg_x)]) + "\n")
    reg_manifest = _bundle(out / "reg", MLP(1, 4, 8), torch.zeros(2, 4), "relu1", loss="mse", data=reg,
                           target="price")
    pixels = rng.uniform(0, 255, size=(30, 3, 4, 4))  # float64: Python reads it as float32 first
    np.savez_compressed(out / "pixels.npz", x=pixels[:20], y=np.arange(20) % 5, x_test=pixels[20:],
                        y_test=np.arange(10) % 5)  # deflate inside the zip
    img_manifest = _bundle(out / "img", MLP(5, 48, 8), torch.zeros(2, 3, 4, 4), "relu1",
                           given=["scale=1/255", "mean=0.485,0.456,0.406", "std=0.229,0.224,0.225"])
    np.savez(out / "tokens.npz", x=rng.integers(0, 20, size=(24, 6)), y=np.arange(24) % 3)  # int64, stored
    embed = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(24, 3))
    tok_manifest = _bundle(out / "tok", embed, torch.zeros(2, 6, dtype=torch.int64), "1", data=out / "tokens.npz")
    np.save(out / "arr.npy", rng.normal(size=(16, 4)))  # float64: read as float32
    np.save(out / "arr.labels.npy", np.arange(16) % 2)
    arr_manifest = _bundle(out / "arr", MLP(2, 4, 8), torch.zeros(2, 4), "relu1")  # no preprocess recorded
    cases = []
    for name, file, manifest, target in [("csv", table, table_manifest, "animal"), ("csv subset", sub, table_manifest, "animal"),
                                         ("csv regression", reg, reg_manifest, "price"),
                                         ("image npz", out / "pixels.npz", img_manifest, None),
                                         ("tokens npz", out / "tokens.npz", tok_manifest, None),
                                         ("npy", out / "arr.npy", arr_manifest, None)]:
        data = load_data(file, load_bundle(manifest.parent).manifest, target=target)
        x, y = torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test])
        cases.append({"name": name, "file": str(file), "manifest": str(manifest), "target": target,
                      "shape": list(x.shape), "x_dtype": "float32" if x.is_floating_point() else "int32",
                      "x": _b64(x), "y_shape": list(y.shape), "y_dtype": "float32" if y.is_floating_point() else "int32",
                      "y": _b64(y)})
    (out / "fixture.json").write_text(json.dumps({"cases": cases}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
