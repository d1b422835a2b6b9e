import json
from pathlib import Path

import pytest
import torch

import splitexport._bundle as bundle_module
from splitexport import (
    BundleError,
    BundleIntegrityError,
    LossSpec,
    OptimizerSpec,
    SourceSpec,
    load_bundle,
    partition,
    write_bundle,
)
from splitexport.models import resnet_cnn

SOURCE = SourceSpec(file_name="m.pt", sha256="0" * 64, kind="state_dict", arch="splitexport.models:resnet_cnn")


@pytest.fixture
def part():
    torch.manual_seed(0)
    return partition(resnet_cnn(), ["layer1", "layer3"], torch.zeros(2, 1, 8, 8))


def test_roundtrip(tmp_path: Path, part) -> None:
    opt = OptimizerSpec(name="adam", lr=1e-3)
    b = write_bundle(part, tmp_path / "b", source=SOURCE, loss=LossSpec(kind="cross_entropy"), optimizer=opt)
    loaded = load_bundle(tmp_path / "b")
    m = loaded.manifest
    assert m.cuts == ["layer1", "layer3"] and m.split == "double" and m.optimizer == opt
    assert [s.role for s in m.segments] == ["device", "server", "device"]
    assert m.segment("B").input.shape == ["batch", 16, 8, 8]
    assert set(m.files) == {"torch/A.pt", "torch/B.pt", "torch/C.pt"}
    x = torch.randn(4, 1, 8, 8)
    y = x
    for seg, s in zip(part.segments, m.segments):
        mod = loaded.torch_segment(s.name).eval()
        seg.module.eval()
        assert torch.equal(mod(y), seg.module(y))
        y = seg.module(y)
    assert b.manifest == m


def test_tampered_file_is_refused(tmp_path: Path, part) -> None:
    write_bundle(part, tmp_path / "b", source=SOURCE)
    path = tmp_path / "b" / "torch" / "B.pt"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="torch/B.pt.*modified"):
        load_bundle(tmp_path / "b")


def test_missing_file_and_bad_manifest(tmp_path: Path, part) -> None:
    write_bundle(part, tmp_path / "b", source=SOURCE)
    (tmp_path / "b" / "torch" / "C.pt").unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        load_bundle(tmp_path / "b")
    manifest = tmp_path / "b" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["files"] = {"../outside": "0" * 64, **raw["files"]}
    manifest.write_text(json.dumps(raw))
    with pytest.raises(BundleIntegrityError, match="outside"):
        load_bundle(tmp_path / "b")
    raw["schema_version"] = 99
    manifest.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="schema_version"):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path)


def test_existing_output_needs_force(tmp_path: Path, part) -> None:
    write_bundle(part, tmp_path / "b", source=SOURCE)
    before = (tmp_path / "b" / "manifest.json").read_text()
    with pytest.raises(BundleError, match="--force"):
        write_bundle(part, tmp_path / "b", source=SOURCE)
    assert (tmp_path / "b" / "manifest.json").read_text() == before
    write_bundle(part, tmp_path / "b", source=SOURCE, force=True)
    load_bundle(tmp_path / "b")


def test_failed_write_leaves_nothing(tmp_path: Path, part, monkeypatch) -> None:
    real = bundle_module._save_torch_segment

    def fail_on_c(seg, path):
        if seg.name == "C":
            raise OSError("disk full")
        return real(seg, path)

    monkeypatch.setattr(bundle_module, "_save_torch_segment", fail_on_c)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(part, tmp_path / "b", source=SOURCE)
    assert list(tmp_path.iterdir()) == []


def test_add_artifacts_records_hashes(tmp_path: Path, part) -> None:
    b = write_bundle(part, tmp_path / "b", source=SOURCE)
    art = tmp_path / "model.bin"
    art.write_bytes(b"\x00\x01")
    b.add_artifacts("fake", {"A": {"model": art}}, {"opt": 1})
    loaded = load_bundle(tmp_path / "b")
    assert loaded.segment("A").artifacts == {"fake": {"model": "fake/A/model.bin"}}
    assert loaded.manifest.exports["fake"] == {"opt": 1}
    art.write_bytes(b"\x02")
    b.add_artifacts("fake", {"C": {"model": art}})  # replaces the earlier export
    loaded = load_bundle(tmp_path / "b")
    assert "fake" not in loaded.segment("A").artifacts
    assert loaded.file(loaded.segment("C").artifacts["fake"]["model"]).read_bytes() == b"\x02"
    assert not any(p.name == "A" for p in (tmp_path / "b").glob("fake*/*"))
