from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from splitexport import ModelLoadError, UnsafePickleError, UntraceableModelError, load_model, partition
from splitexport.models import mlp, resnet_cnn


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return resnet_cnn().eval()


def _check_cuts(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    x = torch.randn(3, 1, 8, 8)
    part = partition(module, ["layer1", "layer3"], torch.zeros(2, 1, 8, 8))
    y = x
    for seg in part.segments:
        seg.module.eval()
        y = seg.module(y)
    assert torch.allclose(y, reference(x), atol=1e-6)


def test_state_dict_with_arch(tmp_path: Path, model) -> None:
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="splitexport.models:resnet_cnn")
    assert loaded.kind == "state_dict" and len(loaded.sha256) == 64
    _check_cuts(loaded.module, model)


def test_state_dict_needs_arch(tmp_path: Path, model) -> None:
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(tmp_path / "m.pt")


def test_state_dict_that_does_not_fit_arch(tmp_path: Path, model) -> None:
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(tmp_path / "m.pt", arch="splitexport.models:mlp")


def test_torchscript_archive(tmp_path: Path, model) -> None:
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.kind == "torchscript"
    _check_cuts(loaded.module, model)


def test_exported_program(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp()
    torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 8, 8),)), str(tmp_path / "m.pt2"))
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.kind == "exported_program"
    part = partition(loaded.module, ["relu1"], torch.zeros(2, 1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(part.segments[1].module(part.segments[0].module(x)), model(x), atol=1e-6)


def test_pickle_refused_without_trust(tmp_path: Path, model) -> None:
    torch.save(model, tmp_path / "m.pt")
    with pytest.raises(UnsafePickleError, match="unpickling runs code"):
        load_model(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", trust_pickle=True)
    assert loaded.kind == "pickle"


def test_missing_file_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "junk.pt")


class _Positions(torch.nn.Module):
    """Token ids + positions built from the ids' device and dtype (TorchScript: prim::device, prim::dtype), F.relu6
    (prim::CallFunction)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(10, 4)
        self.pos = torch.nn.Embedding(6, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device, dtype=ids.dtype)
        return self.head(F.relu6(self.mid(torch.relu(self.tok(ids) + self.pos(positions)))))


def test_torchscript_tensor_attributes_and_op_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Positions().eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    gm = load_model(tmp_path / "m.pt").module
    assert isinstance(gm, torch.fx.GraphModule)
    calls = {n.name: n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert calls["add"] is torch.ops.aten.add.Tensor and calls["relu"] is torch.ops.aten.relu.default  # op names
    assert calls["relu6"] is F.relu6  # a scripted torch function (prim::CallFunction) is called as itself
    assert [n.args[1] for n in gm.graph.nodes if n.target is getattr] == ["device", "dtype"]  # read, not constants
    ids = torch.randint(0, 10, (3, 5))
    assert torch.equal(gm(ids), model(ids))
    part = partition(gm, ["mid"], torch.zeros(2, 5, dtype=torch.int64))
    assert torch.equal(part.segments[1].module(part.segments[0].module(ids)), model(ids))


def _hub_load(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class _CallsOwnFunction(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _hub_load(x) + 1


def test_a_scripted_function_of_the_files_own_is_never_mapped_to_torchs(tmp_path: Path) -> None:
    """A file names its own functions: one scripted as ``torch.hub.load`` must not become a call of torch's."""
    _hub_load.__module__, _hub_load.__name__, _hub_load.__qualname__ = "torch.hub", "load", "load"
    try:
        torch.jit.save(torch.jit.script(_CallsOwnFunction()), str(tmp_path / "m.pt"))
    finally:
        _hub_load.__module__, _hub_load.__name__, _hub_load.__qualname__ = __name__, "_hub_load", "_hub_load"
    with pytest.raises(UntraceableModelError, match=r"calls the scripted function torch\.hub\.load, which splitexport cannot"):
        load_model(tmp_path / "m.pt")
