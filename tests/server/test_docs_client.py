"""A second client, written from docs/protocol.md alone (nothing from ``server`` or ``device_runtime``).

It talks to the server over HTTP with httpx and safetensors, trains A and C itself by the
documented rule (C on the label loss, A on ``sum(out * grad)``, the manifest's optimizer), and must end
with exactly the same weights as the in-process run, for a double and a single split.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load, save

from splitexport import OptimizerSpec, load_bundle, max_abs_difference, torch_split_model
from splitexport.simulation.data import batch_indices
from tests._support import TOKEN, make_bundle, threaded_server

STEPS = 12


class DocsDevice:
    """The device side of docs/protocol.md: A (and C) in torch, B over HTTP."""

    def __init__(self, url: str, token: str, bundle_dir: Path) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        info = self.http.get("/v1/manifest").json()
        manifest = info["manifest"]
        bundle = load_bundle(bundle_dir)  # the device files (the test reads them from disk, not /v1/artifacts)
        self.segments = {s["name"]: bundle.torch_segment(s["name"]) for s in manifest["segments"]
                         if s["role"] == "device"}
        opt = manifest["optimizer"]
        assert opt["name"] == "sgd"
        self.optimizers = {n: torch.optim.SGD(m.parameters(), lr=opt["lr"], momentum=opt["momentum"],
                                              weight_decay=opt["weight_decay"]) for n, m in self.segments.items()}
        self.double = manifest["split"] == "double"
        session = self.http.post("/v1/sessions").json()
        self.session, self.step = session["session_id"], session["next_step"]

    def _call(self, call: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = self.http.post(f"/v1/sessions/{self.session}/steps/{self.step}/{call}", content=save(tensors),
                           headers={"Content-Type": "application/vnd.safetensors"})
        assert r.status_code == 200, r.text
        return load(r.content)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        a = self.segments["A"].train()
        out_a = a(x)
        if self.double:
            out_b = torch.from_numpy(self._call("forward", {"activation": out_a.detach().numpy()})["output"])
            c = self.segments["C"].train()
            c_in = out_b.requires_grad_(True)
            self.optimizers["C"].zero_grad()
            F.cross_entropy(c(c_in), y).backward()  # C: the label loss (mean cross-entropy)
            self.optimizers["C"].step()
            assert c_in.grad is not None
            grad = self._call("backward", {"grad": c_in.grad.numpy()})["grad"]
        else:
            grad = self._call("train", {"activation": out_a.detach().numpy(), "labels": y.numpy()})["grad"]
        self.optimizers["A"].zero_grad()
        (out_a * torch.from_numpy(grad)).sum().backward()  # A: the auxiliary loss, gradient exactly `grad`
        self.optimizers["A"].step()
        self.step += 1


@pytest.mark.parametrize("cuts", [["relu1", "relu2"], ["relu1"]], ids=["double", "single"])
def test_a_client_written_from_the_docs_trains_like_in_process(cuts: list[str], digits, tmp_path: Path) -> None:
    path = make_bundle(tmp_path / "bundle", "mlp", cuts, OptimizerSpec(lr=0.1, momentum=0.9, weight_decay=1e-4))
    batches = list(batch_indices(len(digits.x_train), 32, seed=0, epoch=0))[:STEPS]
    with threaded_server(path, tmp_path / "state") as (url, _):  # the test harness; the client uses only HTTP
        device = DocsDevice(url, TOKEN, path)
        for idx in batches:
            device.train_step(digits.x_train[idx], digits.y_train[idx])
    b = torch.load(tmp_path / "state" / "checkpoint.pt", weights_only=True)["module"]  # written at shutdown
    m = load_bundle(path).manifest
    reference = torch_split_model([load_bundle(path).torch_segment(s.name) for s in m.segments], m.optimizer)
    for idx in batches:
        reference.step(digits.x_train[idx], digits.y_train[idx])
    names = [s.name for s in m.segments]
    got = {f"{n}.{k}": v for n in names for k, v in (b if n == "B" else device.segments[n].state_dict()).items()}
    ref = {f"{n}.{k}": v for n, r in zip(names, reference.runners, strict=True)
           for k, v in r.module.state_dict().items()}  # type: ignore[attr-defined]
    diff, where = max_abs_difference(got, ref)
    print(f"docs-only client ({'double' if len(cuts) == 2 else 'single'} split) vs in process: max |dw| = "
          f"{diff:.3e} ({where})")
    assert got.keys() == ref.keys()
    assert diff == 0.0, where  # float32 on the wire: the same numbers as in process, bit for bit
