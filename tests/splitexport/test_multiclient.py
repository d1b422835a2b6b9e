"""The multi-client harness: byte and FLOP accounting, C3-Score, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitexport import load_bundle
from splitexport._cli import main
from splitexport.simulation import c3_score, simulate_clients
from tests._support import build_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mc")
    build_bundle(root / "single", "mlp", ["relu1"])
    build_bundle(root / "double", "mlp", ["relu1", "relu2"])
    return {"single": root / "single", "double": root / "double"}


def test_psl_accounting_single_split(bundles) -> None:
    res = simulate_clients(load_bundle(bundles["single"]), strategy="psl", clients=2, rounds=1, batch_size=32,
                           progress=False)
    flops = res.config["segment_flops"]
    total = 0
    for name, n in (("client00", 674), ("client01", 673)):
        u = res.per_client[name]
        assert u.bytes_up == n * (64 * 4 + 8)  # float32 activations of 64 features + int64 labels
        assert u.bytes_down == n * 64 * 4  # float32 cut-layer gradients
        assert u.device_flops == 3 * flops["A"] * n and u.server_flops == 3 * flops["B"] * n
        total += u.bytes_up + u.bytes_down
    assert res.total_bytes == total == res.server_bytes_down + sum(u.bytes_up for u in res.per_client.values())
    assert len(res.rounds) == 1 and 0.0 <= res.final_accuracy <= 1.0


def test_double_split_and_broadcast_accounting(bundles) -> None:
    bundle = load_bundle(bundles["double"])
    psl = simulate_clients(bundle, strategy="psl", clients=4, rounds=1, batch_size=16, progress=False)
    sglr = simulate_clients(bundle, strategy="sglr", clients=4, rounds=1, batch_size=16, phi=1.0, progress=False)
    u = psl.per_client["client00"]
    n = 337
    # A's output up, B's output down, C's gradient up, A's gradient down (64 float32 each); no labels leave
    assert u.bytes_up == n * 64 * 4 * 2 and u.bytes_down == n * 64 * 4 * 2
    # clients receive as much, but the server sends SplitAvg's average once per iteration
    assert sum(x.bytes_down for x in sglr.per_client.values()) == sum(x.bytes_down for x in psl.per_client.values())
    assert sglr.server_bytes_down < psl.server_bytes_down and sglr.total_bytes < psl.total_bytes


@pytest.mark.parametrize(
    ("acc", "bw", "comp", "bmax", "cmax", "paper"),
    [  # AdaSplit Tables 1-2: (accuracy, bandwidth GB, client TFLOPs, budgets) -> reported C3
        (0.9192, 2.85, 2.38, 35.94, 11.77, 0.89),
        (0.6790, 34.88, 1.66, 35.94, 11.77, 0.59),
        (0.8888, 9.71, 5.38, 84.64, 17.13, 0.85),
        (0.8509, 2.39, 17.13, 84.64, 17.13, 0.75),
    ],
)
def test_c3_score_reproduces_the_paper(acc, bw, comp, bmax, cmax, paper) -> None:
    assert c3_score(acc, bw, comp, bmax, cmax) == pytest.approx(paper, abs=0.011)


def test_cli_simulate_clients(bundles, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["simulate", str(bundles["single"]), "--clients", "3", "--strategy", "sglr", "--alpha", "0.5",
            "--phi", "0.5", "--client-data", "noniid", "--rounds", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (run,) = metrics["runs"]
    assert (run["strategy"], run["clients"], run["partition"], len(run["rounds"])) == ("sglr", 3, "noniid", 2)
    assert run["config"]["alpha"] == 0.5 and 0 < run["c3_score"] <= 1
    assert (out / "clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final test accuracy" in capsys.readouterr().out


def test_cli_rejects_adasplit_on_a_double_split(bundles, tmp_path: Path, capsys) -> None:
    argv = ["simulate", str(bundles["double"]), "--clients", "2", "--strategy", "adasplit", "--out", str(tmp_path),
            "--no-progress"]
    assert main(argv) == 2
    assert "supports the single split" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_ssl_relay_accounting(bundles) -> None:
    """SSL: each later client downloads the previous one's A once, the server sends every byte a client receives."""
    bundle = load_bundle(bundles["single"])
    res = simulate_clients(bundle, strategy="ssl", clients=3, rounds=1, batch_size=32, progress=False)
    a_bytes = sum(t.numel() * 4 for t in bundle.torch_segment("A").state_dict().values())
    sizes = {"client00": 449, "client01": 449, "client02": 449}
    for c, n in sizes.items():
        u = res.per_client[c]
        assert u.bytes_up == n * (64 * 4 + 8) + a_bytes  # activations, labels, and A handed on after the turn
        assert u.bytes_down == n * 64 * 4 + (a_bytes if c != "client00" else 0)
    assert res.server_bytes_down == sum(u.bytes_down for u in res.per_client.values())
