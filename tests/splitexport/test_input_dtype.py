"""Integer model inputs (token ids): --input-dtype on inspect and partition, recorded in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitexport import load_bundle
from splitexport._cli import main
from tests.zoo import ZOO

TRANSFORMER = ["--arch", "tests.zoo:transformer", "--input-shape", "1,16"]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "transformer.pt"
    torch.save(ZOO["transformer"].factory().state_dict(), path)
    return path


def test_inspect_token_model(model_file: Path, capsys) -> None:
    assert main(["inspect", str(model_file), *TRANSFORMER, "--input-dtype", "int64"]) == 0
    out = capsys.readouterr().out
    assert "int64" in out and "enc1" in out and "mid" in out


def test_float_example_for_a_token_model_is_one_clear_line(model_file: Path, capsys) -> None:
    assert main(["inspect", str(model_file), *TRANSFORMER]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--input-dtype int64" in err and "Traceback" not in err


def test_unknown_input_dtype_is_refused(model_file: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(model_file), *TRANSFORMER, "--input-dtype", "int8"])
    assert info.value.code == 2
    assert "--input-dtype" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_partition_records_every_tensor_dtype(model_file: Path, tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "bundle"
    cuts = ["--cut", "enc1", "--cut", "mid"]
    assert main(["partition", str(model_file), *TRANSFORMER, "--input-dtype", dtype, *cuts, "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tensors = [(s["name"], s["input"]["dtype"], s["output"]["dtype"]) for s in manifest["segments"]]
    assert tensors == [("A", dtype, "float32"), ("B", "float32", "float32"), ("C", "float32", "float32")]
    bundle = load_bundle(out)
    assert bundle.manifest.segments[0].input.torch_dtype == getattr(torch, dtype)
    # the bundle's segment A runs on real token ids of that dtype
    ids = ZOO["transformer"].example(3).to(getattr(torch, dtype))
    assert bundle.torch_segment("A")(ids).shape == (3, 16, 16)
    # and exports to ONNX Runtime, whose runtime takes the integer ids
    assert main(["export", str(out), "--format", "onnx"]) == 0
    from device_runtime import OrtRuntimeError, OrtSegment

    a = OrtSegment.from_bundle(out, "A")
    assert str(a.input_dtype) == dtype
    act = a.forward(ids.numpy())
    assert act.shape == (3, 16, 16)
    with pytest.raises(OrtRuntimeError, match="integer token ids"):
        a.forward(ids.numpy().astype("float32"))
