"""The command line: the users' flows and their error messages (exit 2, nothing half-written)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitexport._cli import main
from splitexport.models import resnet_cnn

ARCH = ["--arch", "splitexport.models:resnet_cnn", "--input-shape", "1,1,8,8"]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(resnet_cnn().state_dict(), path)
    return path


def test_inspect_lists_cut_points(model_file: Path, capsys) -> None:
    assert main(["inspect", str(model_file), *ARCH]) == 0
    out = capsys.readouterr().out
    assert "layer2" in out and "32x4x4" in out and "layer1.conv1 " not in out


def test_partition_and_simulate(model_file: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    assert main(["partition", str(model_file), "--cut", "layer1", "--cut", "layer3", *ARCH, "-o", str(bundle)]) == 0
    assert (bundle / "manifest.json").is_file()
    out_dir = tmp_path / "results"
    assert main(["simulate", str(bundle), "--epochs", "1", "--out", str(out_dir), "--no-progress"]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["max_weight_difference"] <= 1e-5
    assert [r["name"] for r in metrics["runs"]] == ["split (torch)", "monolithic"]
    assert (out_dir / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("cuts", "message"),
    [
        (["layer9"], "no layer named 'layer9'"),
        (["layer2.conv1"], "tensors cross the cut"),
        (["layer3", "layer1"], "cuts out of order"),
    ],
)
def test_partition_errors(model_file: Path, tmp_path: Path, capsys, cuts, message) -> None:
    args = [a for c in cuts for a in ("--cut", c)]
    assert main(["partition", str(model_file), *args, *ARCH, "-o", str(tmp_path / "b")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert not any(p.name.startswith(".b") for p in tmp_path.iterdir())


def test_untraceable_model(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "dyn_models.py").write_text(
        "import torch\n"
        "class Dyn(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0: x = -x\n"
        "        return self.fc(x.flatten(1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import dyn_models

    torch.save(dyn_models.Dyn().state_dict(), tmp_path / "dyn.pt")
    code = main(["partition", str(tmp_path / "dyn.pt"), "--arch", "dyn_models:Dyn", "--input-shape", "1,1,8,8",
                 "--cut", "fc", "-o", str(tmp_path / "b")])
    assert code == 2
    assert "could not trace" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_pickle_without_trust(tmp_path: Path, capsys) -> None:
    torch.save(resnet_cnn(), tmp_path / "whole.pt")
    assert main(["inspect", str(tmp_path / "whole.pt"), "--input-shape", "1,1,8,8"]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "runs code" in err
    assert main(["inspect", str(tmp_path / "whole.pt"), "--input-shape", "1,1,8,8", "--trust-pickle"]) == 0


def test_tampered_bundle(model_file: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    assert main(["partition", str(model_file), "--cut", "layer2", *ARCH, "-o", str(bundle)]) == 0
    with open(bundle / "torch" / "A.pt", "ab") as f:
        f.write(b"x")
    assert main(["simulate", str(bundle), "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert "torch/A.pt" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_input_shape_message(model_file: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(model_file), "--arch", "splitexport.models:resnet_cnn", "--input-shape", "a,b"])
    assert exc.value.code == 2
    assert "--input-shape" in capsys.readouterr().err


def test_export_without_its_exporter_is_a_clear_error(model_file: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    bundle = tmp_path / "bundle"
    assert main(["partition", str(model_file), "--cut", "layer2", *ARCH, "-o", str(bundle)]) == 0
    before = (bundle / "manifest.json").read_text()
    monkeypatch.setitem(sys.modules, "splitexport.export._onnx", None)  # as if the extra were missing
    assert main(["export", str(bundle), "--format", "onnx"]) == 2
    assert "onnx exporter is not available" in capsys.readouterr().err
    assert (bundle / "manifest.json").read_text() == before


# -- bad input on every command: one line on stderr, no traceback, exit 2 ------------------------------------------


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    from splitexport import OptimizerSpec, SourceSpec, partition, write_bundle
    from splitexport.models import mlp

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "bundle"
    write_bundle(partition(mlp(), ["relu1", "relu2"], torch.zeros(1, 1, 8, 8)), path,
                 source=SourceSpec(file_name="mlp.pt", sha256="0" * 64, kind="state_dict"), optimizer=OptimizerSpec())
    return path


def one_line_error(capsys, call) -> str:
    """Run a CLI entry point; it must exit 2 with exactly one line on stderr and no traceback, within 60 s
    (a ``serve`` that accepted bad input would otherwise listen forever)."""

    def too_slow(signum: int, frame: object) -> None:
        raise TimeoutError("the command did not fail within 60 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        code = call()
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def fill(argv: list[str], tmp: Path, **paths: Path) -> list[str]:
    """Put real paths for ``{name}`` placeholders; ``{file}`` is a plain file (a folder cannot go under it)."""
    (tmp / "file").write_text("not a folder")
    subs = {"{tmp}": str(tmp), "{file}": str(tmp / "file"), **{f"{{{k}}}": str(v) for k, v in paths.items()}}
    out = []
    for arg in argv:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


BAD_INPUT = [  # (argv with {model}/{bundle}/{file} placeholders, what the line must say)
    (["inspect", "{model}", *ARCH[:2], "--input-shape", "1,3,32,32"], "failed at stem.0"),
    (["inspect", "{model}", *ARCH[:2], "--input-shape", "a,b"], "--input-shape"),
    (["inspect", "{model}.missing", *ARCH], "does not exist"),
    (["inspect", "{model}"], "required: --input-shape"),
    (["partition", "{model}", *ARCH, "--cut", "layer1", "-o", "{tmp}/b", "--lr", "-1"], "--lr: must be greater than 0"),
    (["partition", "{model}", *ARCH, "--cut", "layer1", "-o", "{tmp}/b", "--momentum", "-0.5"], "--momentum"),
    (["partition", "{model}", *ARCH, "--cut", "layer1", "-o", "{file}/b"], "is not a directory"),
    (["simulate", "{bundle}", "--clients", "0"], "--clients: must be at least 1, got 0"),
    (["simulate", "{bundle}", "--out", "{file}/results"], "--out: "),
    (["simulate", "{bundle}", "--epochs", "0"], "--epochs: must be at least 1"),
    (["simulate", "{bundle}", "--seed", "-1"], "--seed"),
    (["simulate", "{bundle}", "--lr", "nan"], "finite"),
    (["simulate", "{bundle}", "--phi", "2"], "--phi: must be between 0 and 1"),
    (["simulate", "{bundle}", "--server", "localhost:8000"], "expected a URL"),
    (["simulate", "{tmp}/nowhere"], "not a bundle"),
    (["export", "{bundle}", "--format", "coreml"], "invalid choice: 'coreml'"),
    (["export", "{bundle}", "--format", "onnx", "--batch-size", "0"], "--batch-size"),
    (["export", "{bundle}", "--format", "onnx", "--opset", "3"], "opset 3 is not supported"),
    (["serve", "{bundle}", "--tokens", "/nonexistent"], "--tokens: /nonexistent does not exist"),
    (["serve", "{bundle}", "--port", "99999"], "--port: a TCP port is 1..65535, got 99999"),
    (["serve", "{bundle}", "--port", "http"], "--port: expected an integer"),
    (["serve", "{bundle}", "--threads", "0"], "--threads"),
    (["serve", "{bundle}", "--strategy", "psl", "--clients", "0"], "--clients"),
    (["serve", "{bundle}", "--round-timeout", "-5"], "--round-timeout"),
    (["serve", "{bundle}", "--log-level", "loud"], "--log-level"),
    (["serve", "{bundle}", "--host", "0.0.0.0"], "without bearer tokens"),
    (["serve", "{tmp}/nowhere"], "not a bundle"),
    (["serve", "{bundle}", "--host", "no-such-host.invalid", "--tokens", "{file}"], "check --host"),
    (["deploy", "{bundle}", "--to", "{file}/assets"], "is not a directory"),
    (["deploy", "{tmp}/nowhere", "--to", "{tmp}/assets"], "not a bundle"),
    (["demo", "--epochs", "0"], "--epochs: must be at least 1"),
    (["demo", "--out", "{file}/demo"], "is not a directory"),
    (["demo", "--model", "gpt"], "invalid choice"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "required: command"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a[:1] + a[2:])[:60] for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(argv, message, model_file: Path, small_bundle: Path, tmp_path: Path,
                                      capsys) -> None:
    args = fill(argv, tmp_path, model=model_file, bundle=small_bundle)
    line = one_line_error(capsys, lambda: main(args))
    assert message in line, line
    assert line.startswith("splitexport")
    assert not (tmp_path / "b").exists() and not (tmp_path / "assets").exists()


def test_port_in_use_is_one_line(small_bundle: Path, capsys) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(capsys, lambda: main(["serve", str(small_bundle), "--port", str(port)]))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


def test_invalid_settings_from_the_environment_are_one_line(small_bundle: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPLITEXPORT_MAX_BATCH", "0")  # pydantic's error, formatted as one line
    line = one_line_error(capsys, lambda: main(["serve", str(small_bundle)]))
    assert "invalid server settings: max_batch: Input should be greater than or equal to 1 (got '0')" in line
    monkeypatch.delenv("SPLITEXPORT_MAX_BATCH")
    monkeypatch.setenv("SPLITEXPORT_PORT", "99999")  # past the --port check
    assert "a TCP port is 1..65535" in one_line_error(capsys, lambda: main(["serve", str(small_bundle)]))


def test_damaged_server_state_is_one_line(small_bundle: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "checkpoint.pt").write_bytes(b"garbage")
    line = one_line_error(capsys, lambda: main(["serve", str(small_bundle), "--state-dir", str(tmp_path / "state")]))
    assert "checkpoint.pt is damaged" in line and "--state-dir" in line
    assert (tmp_path / "state" / "checkpoint.pt").read_bytes() == b"garbage"


def test_os_errors_are_one_line(small_bundle: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "assets").symlink_to(tmp_path / "gone")  # a dangling link: deploy cannot replace it with a folder
    line = one_line_error(capsys, lambda: main(["deploy", str(small_bundle), "--to", str(tmp_path / "assets")]))
    assert line.startswith("splitexport: error: ") and "assets" in line
    assert (tmp_path / "assets").is_symlink()


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--server", "127.0.0.1:8000", "--bundle", "{bundle}"], "--server: expected a URL"),
    (["train", "--server", "http://127.0.0.1:9", "--bundle", "{tmp}/nowhere"], "not a bundle"),
    (["train", "--server", "http://127.0.0.1:9", "--bundle", "{bundle}", "--epochs", "0"], "--epochs"),
    (["train", "--server", "http://127.0.0.1:9", "--bundle", "{bundle}", "--out", "{file}/r"], "not a directory"),
    (["train"], "required: --server, --bundle"),
])
def test_device_runtime_bad_input_is_one_line(argv, message, small_bundle: Path, tmp_path: Path, capsys) -> None:
    from device_runtime._train import main as device_main

    args = fill(argv, tmp_path, bundle=small_bundle)
    assert message in one_line_error(capsys, lambda: device_main(args))


def test_bad_input_through_the_console_entry_point(model_file: Path) -> None:
    """The real process: ShapeProp's own traceback printing must not reach the terminal either."""
    r = subprocess.run([sys.executable, "-m", "splitexport", "inspect", str(model_file), *ARCH[:2], "--input-shape",
                        "1,3,32,32"], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "Check --input-shape" in r.stderr
