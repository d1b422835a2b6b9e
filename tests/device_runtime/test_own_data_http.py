"""Own data end to end over real HTTP: a CSV regression, a PNG image folder and a token ``.npz`` (transformer),
ONNX Runtime devices.

Also: an app that reproduces the transform from manifest.json alone (docs/bundle.md) feeds the device
segment exactly what simulate feeds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from device_runtime._train import main as device_main
from splitexport import MonolithicModel, compose, load_bundle
from splitexport._cli import main as cli
from splitexport._trainer import fit
from splitexport.simulation.datafiles import load_data
from tests._support import TOKEN, threaded_server
from tests.splitexport.test_data import bundle, write_csv, write_digit_folder

pytest.importorskip("onnxruntime.training")


def ort_app_assets(b: Path, to: Path) -> Path:
    assert cli(["export", str(b), "--format", "onnx", "--optimizer", "sgd"]) == 0
    assert cli(["deploy", str(b), "--to", str(to)]) == 0
    return to


def test_csv_regression_with_ort_devices_over_http(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 4)) * [1, 10, 0.1, 3] + [0, 50, 1, -2]  # unscaled features: the transform matters
    y = x @ np.array([1.0, 0.2, 5.0, -0.5]) + 0.05 * rng.normal(size=240)
    csv = write_csv(tmp_path / "houses.csv", [[*r.round(5), round(t, 5)] for r, t in zip(x, y, strict=True)],
                    ["a", "b", "c", "d", "price"])
    b = bundle(tmp_path / "b", (4,), 1, loss="mse", lr=0.01, preprocess_from=csv, target="price")
    assets = ort_app_assets(b, tmp_path / "app")
    recorded = load_bundle(b).manifest.preprocess
    assert recorded is not None and recorded.feature_names == ["a", "b", "c", "d"] and recorded.num_classes == 0
    assert load_bundle(assets).manifest.preprocess == recorded  # the phone's copy carries the transform
    with threaded_server(b, tmp_path / "state") as (url, _):
        rc = device_main(["train", "--server", url, "--bundle", str(assets), "--token", TOKEN, "--runtime", "onnx",
                          "--data", str(csv), "--target", "price", "--epochs", "6", "--batch-size", "16",
                          "--no-progress", "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    http = json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs"]
    # the same training in process (monolithic torch): the same losses epoch by epoch
    data = load_data(csv, load_bundle(b).manifest, target="price")
    manifest = load_bundle(b).manifest
    torch.manual_seed(0)
    mono = MonolithicModel(compose([load_bundle(b).torch_segment(s.name) for s in manifest.segments]),
                           manifest.optimizer, "mse")
    ref = fit(mono, data, name="mono", epochs=6, batch_size=16, loss="mse", progress=False).epochs
    mse = http[-1]["test_loss"]
    print(f"\nCSV regression, ORT devices over HTTP: test MSE {http[0]['test_loss']:.4f} -> {mse:.4f} "
          f"(target variance {float(data.y_test.var()):.2f}); monolithic {ref[-1].test_loss:.4f}")
    assert f"final test MSE {mse:.4f}" in out.out
    for h, r in zip(http, ref, strict=True):
        assert abs(h["test_loss"] - r.test_loss) <= 1e-3 * max(1.0, r.test_loss), (h, r)
    assert mse < 0.05 * float(data.y_test.var())


def test_image_folder_through_simulate_and_device_runtime(tmp_path: Path, capsys) -> None:
    root = write_digit_folder(tmp_path / "photos", n=300, size=8)  # 8x8 digits as RGB PNGs, resized to 16x16
    b = bundle(tmp_path / "b", (3, 16, 16), 10, lr=0.05, preprocess_from=root)
    assets = ort_app_assets(b, tmp_path / "app")
    assert cli(["simulate", str(b), "--data", str(root), "--epochs", "8", "--batch-size", "8",
                "--device-runtime", "onnx",
                "--no-progress", "--out", str(tmp_path / "sim")]) == 0
    sim = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    with threaded_server(b, tmp_path / "state") as (url, _):
        rc = device_main(["train", "--server", url, "--bundle", str(assets), "--token", TOKEN, "--runtime", "onnx",
                          "--data", str(root), "--epochs", "8", "--batch-size", "8", "--no-progress",
                          "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    http = json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs"]
    ort_sim = next(r for r in sim["runs"] if "onnx" in r["name"])["epochs"]
    print(f"\nimage folder 3x16x16, ORT devices: simulate test acc {ort_sim[-1]['test_accuracy']:.4f}, "
          f"over HTTP {http[-1]['test_accuracy']:.4f}")
    # simulate's ORT run and the device over HTTP see the same data the same way: the same curve
    for h, s in zip(http, ort_sim, strict=True):
        assert abs(h["test_loss"] - s["test_loss"]) < 1e-4, (h, s)
    assert http[-1]["test_accuracy"] > 0.8


def test_the_documented_transform_gives_the_same_activation(tmp_path: Path) -> None:
    """An app reading only manifest.json (docs/bundle.md, "Preprocessing") feeds A what simulate feeds it."""
    from device_runtime import OrtRunner

    root = write_digit_folder(tmp_path / "photos", n=40, size=8, color=True)
    b = bundle(tmp_path / "b", (3, 16, 16), 10, preprocess_from=root)
    assert cli(["export", str(b), "--format", "onnx"]) == 0
    pre = json.loads((b / "manifest.json").read_text())["preprocess"]
    h, w = pre["image_size"]
    files = sorted(root.glob("*/*.png"))
    app = []
    for f in files:  # the documented recipe, in numpy
        px = np.asarray(Image.open(f).convert(pre["channel_order"]).resize((w, h), Image.Resampling.BILINEAR),
                        dtype=np.float64).transpose(2, 0, 1)
        app.append((px * pre["scale"] - np.array(pre["mean"])[:, None, None]) / np.array(pre["std"])[:, None, None])
    app_x = torch.tensor(np.stack(app), dtype=torch.float32)
    sim = load_data(root, load_bundle(b).manifest)
    sim_x = torch.cat([sim.x_train, sim.x_test])
    # the same samples (in another order after the split): match each simulate row to its app row
    dist = (sim_x.flatten(1)[:, None, :] - app_x.flatten(1)[None, :, :]).abs().amax(-1)
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(len(files)))
    assert float(dist.min(1).values.max()) < 1e-5
    loaded = load_bundle(b)
    torch_a = loaded.torch_segment("A").eval()
    ort_a = OrtRunner.from_bundle(loaded, "A")
    with torch.no_grad():
        want = torch_a(sim_x)
    got = ort_a.evaluate(app_x[match])
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_multi_client_csv_over_http_matches_in_process(tmp_path: Path) -> None:
    """``simulate --data t.csv --clients 3 --client-data noniid --server URL``: the same rounds as in process."""
    rng = np.random.default_rng(1)
    rows = [[*(rng.normal(size=3) * 5 + 10 * k).round(4), k] for k in range(3) for _ in range(40)]
    csv = write_csv(tmp_path / "t.csv", rows, ["a", "b", "c", "y"])
    b = bundle(tmp_path / "b", (3,), 3, lr=0.1, preprocess_from=csv, target="y")
    common = ["--data", str(csv), "--target", "y", "--clients", "3", "--client-data", "noniid", "--strategy", "psl",
              "--rounds", "10", "--no-progress"]
    assert cli(["simulate", str(b), *common, "--out", str(tmp_path / "local")]) == 0
    with threaded_server(b, tmp_path / "state", strategy="psl", num_clients=3) as (url, _):
        assert cli(["simulate", str(b), *common, "--server", url, "--token", TOKEN, "--out", str(tmp_path / "http")]) == 0
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())["runs"][0]
    http = json.loads((tmp_path / "http" / "metrics.json").read_text())["runs"][0]
    print(f"\nCSV, 3 non-IID clients, psl, 10 rounds: test accuracy in process {local['final_accuracy']:.4f}, "
          f"over HTTP {http['final_accuracy']:.4f}; on each client's own classes {http['final_local_accuracy']:.4f}")
    for lr_, hr in zip(local["rounds"], http["rounds"], strict=True):
        assert abs(lr_["test_loss"] - hr["test_loss"]) < 1e-4, (lr_, hr)
    assert http["final_local_accuracy"] > 0.9  # non-IID: each client's model knows the classes it holds


def write_token_npz(path: Path, n: int = 240, *, length: int = 16, vocab: int = 50) -> Path:
    """Two-class token sequences: 40% of each sequence's ids come from its class's band (5..14 or 35..44)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    band = rng.integers(0, 10, (n, length)) + np.where(y == 0, 5, 35)[:, None]
    x = np.where(rng.random((n, length)) < 0.4, band, rng.integers(0, vocab, (n, length)))
    np.savez(path, x=x.astype(np.int64), y=y)
    return path


def test_token_npz_with_a_transformer_over_http(tmp_path: Path, capsys) -> None:
    """A token ``.npz`` and the zoo's transformer (int64 ids, A|B|C): simulate with ORT devices, then
    ``python -m device_runtime train`` against a ``splitexport serve`` child process; B's weights match the same
    training in process."""
    import os
    import subprocess
    import sys

    from device_runtime import OrtRunner
    from device_runtime._train import device_runner
    from splitexport import SplitModel, max_abs_difference
    from tests._support import ServerProcess
    from tests.zoo import transformer

    torch.manual_seed(0)
    torch.save(transformer().state_dict(), tmp_path / "t.pt")
    tokens = write_token_npz(tmp_path / "tokens.npz")
    b = tmp_path / "b"
    assert cli(["partition", str(tmp_path / "t.pt"), "--arch", "tests.zoo:transformer", "--input-shape", "1,16",
                "--input-dtype", "int64", "--cut", "enc1", "--cut", "mid", "-o", str(b), "--data", str(tokens),
                "--lr", "0.1", "--preprocess", "label_names=neg,pos"]) == 0
    manifest = load_bundle(b).manifest
    assert manifest.preprocess is not None and manifest.preprocess.kind == "tokens"
    assert manifest.preprocess.label_names == ["neg", "pos"] and manifest.preprocess.num_classes == 2
    assert manifest.segments[0].input.dtype == "int64"
    assets = ort_app_assets(b, tmp_path / "app")
    run = ["--data", str(tokens), "--epochs", "4", "--batch-size", "16", "--no-progress"]
    assert cli(["simulate", str(b), *run, "--device-runtime", "onnx", "--out", str(tmp_path / "sim")]) == 0
    sim = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert sim["max_weight_difference"] == 0.0  # split torch == monolithic, token ids and all
    assert sim["weight_differences"]["split (onnx devices)"]["max"] < 1e-5
    ort_sim = next(r for r in sim["runs"] if "onnx" in r["name"])["epochs"]
    (tmp_path / "tokens.txt").write_text(TOKEN + "\n")
    server = ServerProcess(b, tmp_path / "state", tmp_path / "tokens.txt")
    server.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "device_runtime", "train", "--server", server.url, "--bundle",
                               str(assets), "--runtime", "onnx", *run, "--out", str(tmp_path / "out")],
                              env={**os.environ, "SPLITEXPORT_TOKEN": TOKEN}, capture_output=True, text=True, check=False,
                              timeout=300)
    finally:
        server.stop()  # a clean shutdown writes B's final checkpoint
    assert proc.returncode == 0, proc.stderr
    http = json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs"]
    # the same training in process: ORT for A and C, torch for B, the same seed and batches
    loaded = load_bundle(b)
    data = load_data(tokens, manifest)
    assert data.x_train.dtype == torch.int64
    torch.manual_seed(0)
    ref_b = device_runner(loaded, "B", "torch")
    ref = SplitModel([OrtRunner.from_bundle(loaded, "A"), ref_b, OrtRunner.from_bundle(loaded, "C")])
    fit(ref, data, name="in process", epochs=4, batch_size=16, seed=0, progress=False)
    saved = torch.load(tmp_path / "state" / "checkpoint.pt", weights_only=True)["module"]
    diff, where = max_abs_difference(saved, ref_b.module.state_dict())  # type: ignore[attr-defined]
    acc = http[-1]["test_accuracy"]
    print(f"\ntoken .npz, transformer A|B|C, ORT devices over HTTP: test accuracy {http[0]['test_accuracy']:.4f} -> "
          f"{acc:.4f} (simulate ORT {ort_sim[-1]['test_accuracy']:.4f}); B vs in process max |dw| {diff:.3e} ({where})")
    assert f"final test accuracy {acc:.4f}" in proc.stdout
    for h, s in zip(http, ort_sim, strict=True):
        assert abs(h["test_loss"] - s["test_loss"]) < 1e-4, (h, s)
    assert diff < 1e-5, f"{where} differs by {diff}"
    assert acc > 0.85
