"""``splitexport plan`` on the example models and digits: the table, JSON and plot, its numbers checked
against what they stand for, and its bad-input messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from splitexport import protocol
from splitexport._cli import main
from splitexport._plan import Candidate, bandwidth, duration, mark_pareto
from splitexport.models import mlp, resnet_cnn

pytest.importorskip("onnxruntime.training")

PNG = b"\x89PNG\r\n\x1a\n"


def _model(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pt"
    torch.save({"mlp": mlp, "resnet_cnn": resnet_cnn}[name]().state_dict(), path)
    return path


def _plan(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / "out"
    rc = main(["plan", str(_model(tmp_path, name)), "--arch", f"splitexport.models:{name}", "--input-shape", "1,1,8,8",
               "--reps", "2", "--out", str(out), *extra])
    assert rc == 0
    assert (out / "plan.png").read_bytes()[:8] == PNG
    return json.loads((out / "plan.json").read_text())


def _body(**arrays: np.ndarray) -> int:
    return len(protocol.encode(arrays))


def test_plan_single_split_mlp_on_digits(tmp_path: Path, capsys) -> None:
    plan = _plan(tmp_path, "mlp", "--bandwidth", "10mbit", "--rtt", "40ms")
    out = capsys.readouterr().out
    s = plan["settings"]
    assert s["train_samples"] == 1347 and s["batch_size"] == 32 and s["split"] == "single"  # digits' 75 % split
    assert s["bandwidth_bps"] == 10e6 and s["rtt_s"] == pytest.approx(0.04) and s["device_time_scale"] == 1.0
    by = {c["label"]: c for c in plan["candidates"]}
    assert set(by) == {"fc1", "relu1", "fc2", "relu2"}  # the cut after flatten leaves A without parameters
    assert [sk["cuts"] for sk in s["skipped"]] == [["flatten"]]
    for label in by:
        assert f"\n{label} " in out
    assert "flatten" in out and "skipped" in out and "Pareto-best:" in out

    c = by["fc1"]  # A = flatten + fc1 (64*64 + 64 params), 64 floats per sample cross the cut
    z = np.zeros
    up = _body(activation=z((32, 64), np.float32), labels=z(32, np.int64))
    down = _body(grad=z((32, 64), np.float32), loss=z(1, np.float32), output=z((32, 10), np.float32))
    assert c["bytes_up"]["float32"] == up and c["bytes_down"]["float32"] == down
    assert c["bytes_up"]["float16"] < 0.6 * up and c["requests"] == 1
    assert c["device_params"] == 64 * 64 + 64
    mem = c["device_memory"]
    assert mem["params"] == mem["gradients"] == 4 * (64 * 64 + 64) and mem["optimizer_state"] == 0
    assert mem["activations"] == 32 * 4 * (64 + 64 + 64)  # input, flatten, fc1 outputs
    assert c["device_time_s"] > 0 and c["server_time_s"] > 0
    expected = c["device_time_s"] + c["server_time_s"] + 0.04 + (up + down) * 8 / 10e6
    assert c["step_time_s"]["float32"] == pytest.approx(expected)
    assert c["epoch_time_s"]["float32"] == pytest.approx(expected * 43)  # ceil(1347 / 32)
    assert any(c["pareto"] for c in plan["candidates"])


def test_plan_double_split_and_device_profile(tmp_path: Path, capsys) -> None:
    plan = _plan(tmp_path, "mlp", "--double", "--device-profile", "phone-low", "--optimizer", "adamw")
    s = plan["settings"]
    assert s["split"] == "double" and s["device_flops_per_s"] == 2e9
    assert s["device_time_scale"] == pytest.approx(s["host_matmul_flops_per_s"] / 2e9)
    by = {c["label"]: c for c in plan["candidates"]}
    assert "relu1+relu2" in by and "fc1+fc2" in by
    c = by["relu1+relu2"]  # A = fc1 (4160 params), C = fc3 (650 params); B = fc2 on the server
    assert c["requests"] == 2 and c["device_params"] == 4160 + 650
    assert c["device_memory"]["optimizer_state"] == 2 * 4 * (4160 + 650)  # AdamW: two moments
    assert c["device_time_s"] == pytest.approx(c["device_time_host_s"] * s["device_time_scale"])
    act = _body(activation=np.zeros((32, 64), np.float32))
    assert c["bytes_up"]["float32"] == act + _body(grad=np.zeros((32, 64), np.float32))
    assert "relu1+relu2" in capsys.readouterr().out


def test_plan_resnet_single_split(tmp_path: Path, capsys) -> None:
    plan = _plan(tmp_path, "resnet_cnn", "--device-flops", "4e9", "--rtt", "0ms")
    by = {c["label"]: c for c in plan["candidates"]}
    assert {"layer1", "layer2", "layer3"} <= set(by)
    # deeper cuts: more device FLOPs and parameters, fewer bytes after the stride-2 layer2
    assert by["layer1"]["device_flops"] < by["layer2"]["device_flops"] < by["layer3"]["device_flops"]
    assert by["layer2"]["bytes_up"]["float32"] < by["layer1"]["bytes_up"]["float32"]
    assert plan["settings"]["device_profile"] == "custom"
    best = [c for c in plan["candidates"] if c["pareto"]]
    for b in best:  # nothing dominates a Pareto-best candidate
        assert not any(o["step_time_s"]["float32"] < b["step_time_s"]["float32"] and
                       o["device_memory"]["total"] < b["device_memory"]["total"] for o in plan["candidates"])


def _cand(t: float, m: int) -> Candidate:
    return Candidate(cuts=(f"{t}-{m}",), device_flops=0, server_flops=0, device_params=0, device_time_host_s=0,
                     device_time_s=0, server_time_s=0, requests=1, bytes_up={}, bytes_down={},
                     device_memory={"total": m}, step_time_s={"float32": t})


def test_pareto_marks_exactly_the_undominated() -> None:
    cands = [_cand(1.0, 10), _cand(2.0, 5), _cand(2.0, 10), _cand(0.5, 20), _cand(1.0, 10)]
    mark_pareto(cands)
    assert [c.pareto for c in cands] == [True, True, False, True, True]


def test_units() -> None:
    assert bandwidth("20mbit") == 20e6 and bandwidth("500kbit/s") == 5e5 and bandwidth("1Gbps") == 1e9
    assert duration("60ms") == pytest.approx(0.06) and duration("0.5s") == 0.5 and duration("0ms") == 0.0


@pytest.mark.parametrize(("args", "message"), [
    (["--bandwidth", "fast"], "argument --bandwidth: expected a bandwidth like 20mbit"),
    (["--bandwidth", "0mbit"], "the bandwidth must be positive"),
    (["--rtt", "60"], "argument --rtt: expected a time like 60ms"),
    (["--device-profile", "tablet"], "argument --device-profile: invalid choice"),
    (["--device-profile", "phone-low", "--device-flops", "1e9"], "not allowed with argument --device-profile"),
    (["--device-flops", "-3"], "argument --device-flops: must be greater than 0"),
    (["--target", "y"], "--target needs --data PATH"),
])
def test_plan_bad_input_is_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    model = _model(tmp_path, "mlp")
    try:
        code = main(["plan", str(model), "--arch", "splitexport.models:mlp", "--input-shape", "1,1,8,8",
                     "--out", str(tmp_path / "o"), *args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
