"""Every non-sequence op of the op table trains in a device segment like torch (issue 10).

tests/op_models.py holds three small models that together contain the ops; each is trained as
a last segment (labels, C) and as a segment that trains on a received gradient (A), for 20
steps, in TFLite flex, TFLite builtin (stock LiteRT) and TF.js (Node), and compared with torch
per step (weights, BN statistics, input gradients within 1e-5, torch's state loaded before
every step) and free-running. Exports are shared per module.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from tests.op_models import BATCH, MODELS, TwoDropouts
from tests.tf_reference import STATS_TOL, TOL, Case, Reference, reference

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from device_runtime._tflite import TfliteSegment
from splitexport import ExportError
from splitexport.export._tflite import Variant, export_tflite_segment
from tests.device_runtime.test_tflite_runtime import _free_running, _per_step

_LR_A = {"activations": 2.0, "grouped_convs": 1.0}
"""Learning rates large enough that every weight moves by far more than the 1e-5 tolerance per step (the
activations and grouped_convs models' aux-loss gradients are small); larger ones make the others' weights grow
until float rounding alone exceeds the tolerance."""

CASES = [
    Case(f"{name}_{role}", name, model=factory, input_shape=shape, is_last=role == "C",
         optimizer={"name": "sgd", "lr": _LR_A.get(name, 0.05), "momentum": 0.9} if role == "A"
         else {"name": "sgd", "lr": 0.2})
    for name, (factory, shape) in MODELS.items()
    for role in ("A", "C")
]
IDS = [c.name for c in CASES]
_REFS: dict[str, Reference] = {}


def _ref(case: Case) -> Reference:
    if case.name not in _REFS:
        _REFS[case.name] = reference(case)
    return _REFS[case.name]


class _Functional(nn.Module):
    """The functional forms the op models call as modules (TorchScript: aten.relu6, aten.silu, aten.softmax, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        with torch.no_grad():
            self.fc.weight.mul_(8)  # outputs over the activations' kinks (+-3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        a = torch.concat([F.relu6(h), F.silu(h)], dim=2)
        b = torch.cat([F.hardswish(h), F.hardsigmoid(h)], -1)
        return F.gelu(F.softmax(torch.bmm(a, b.transpose(1, 2)), dim=-1), approximate="tanh")


_SCRIPTED = {**MODELS, "functional": (_Functional, (BATCH, 5, 6))}


@pytest.mark.parametrize("name", sorted(_SCRIPTED))
def test_the_torchscript_copy_of_every_op_model_maps_like_fx(name: str) -> None:
    """A bundle stores TorchScript, which the exports read as fx (``torchscript_to_fx``: aten overloads, kept
    submodules): every op must give the layers, attributes, wiring and weights of the traced module, and compute
    torch's function."""
    from splitexport.export._keras import keras_model
    from splitexport.export._layergraph import LayerGraph, layer_graph
    from tests.splitexport.export.test_seq_ops_errors import _scripted

    factory, shape = _SCRIPTED[name]
    torch.manual_seed(0)
    module = fx.symbolic_trace(factory()).eval()

    def summary(graph: LayerGraph) -> list[tuple[object, ...]]:
        index = {lyr.name: i for i, lyr in enumerate(graph.layers)}
        return [(lyr.kind, lyr.shape, lyr.attrs, [index[i] for i in lyr.inputs], lyr.torch_names)
                for lyr in graph.layers]

    eager, scripted = layer_graph(module, shape), layer_graph(_scripted(module), shape)
    assert summary(scripted) == summary(eager)
    assert scripted.output_shape == eager.output_shape
    for a, b in zip(scripted.layers, eager.layers):
        assert a.weights.keys() == b.weights.keys() and all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = module(x).numpy()
    assert np.abs(keras_model(scripted)(x.numpy(), training=False).numpy() - ref).max() < 1e-5


@pytest.mark.parametrize("variant", ["flex", "builtin"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tflite_trains_every_op_like_torch(case: Case, variant: str, tmp_path: Path) -> None:
    ref = _ref(case)
    export_tflite_segment(ref.module, ref.input_shape, tmp_path, is_last=ref.is_last, optimizer=case.optimizer,
                          variants=(variant,), batch_size=ref.input_shape[0])  # type: ignore[arg-type]
    seg = TfliteSegment.from_directory(tmp_path, variant=variant)  # type: ignore[arg-type]
    free = _free_running(seg, ref)
    step = _per_step(seg, ref)
    print(f"\n{case.name} tflite-{variant}: per step {step} | free-running {free}")
    assert step["weights"] <= TOL and step["grad_input"] <= TOL and step["running_stats"] <= TOL, step
    assert free["forward"] <= TOL and free["loss_rel"] <= TOL, free
    assert free["weights"] <= TOL and free["grad_input"] <= TOL and free["running_stats"] <= STATS_TOL, free


def test_tfjs_trains_every_op_like_torch(tmp_path: Path) -> None:
    pytest.importorskip("tensorflowjs")
    from tests.device_runtime.tfjs_fixtures import run_js_equivalence

    rows = run_js_equivalence(CASES, tmp_path)
    for name in IDS:
        r = rows[name]
        print(f"\n{name} tfjs: per step {r['per_step']} | free-running {r['free']}")
        assert max(r["per_step"].values()) <= TOL
        assert r["free"]["weights"] <= TOL and r["free"]["grad_input"] <= TOL


class _Drop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 32)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


@pytest.mark.parametrize("variant", ["flex", "builtin"])
def test_dropout_trains_on_the_mask_it_sent(variant: str, tmp_path: Path) -> None:
    """forward() (the activation sent) and the training step draw the same mask; the next step a new one."""
    torch.manual_seed(0)
    model = _Drop()
    variants: tuple[Variant, ...] = (variant,)  # type: ignore[assignment]
    export_tflite_segment(fx.symbolic_trace(model), (8, 12), tmp_path, is_last=False, variants=variants,
                          batch_size=8, optimizer={"name": "sgd", "lr": 0.1})
    seg = TfliteSegment.from_directory(tmp_path, variant=variant)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)
    masks = []
    for _ in range(3):
        x = torch.randn(8, 12, generator=gen)
        g = torch.randn(8, 32, generator=gen)
        before = seg.parameters()
        sent = seg.forward(x.numpy())
        assert np.array_equal(sent, seg.forward(x.numpy()))  # forward has no side effects
        with torch.no_grad():
            lin = torch.nn.functional.linear(x, torch.from_numpy(before["fc.weight"]), torch.from_numpy(before["fc.bias"]))
        mask = torch.from_numpy(sent) / lin  # 0 or 1 / (1 - p)
        assert torch.all((mask.abs() < 1e-4) | ((mask - 2.0).abs() < 1e-4))
        mask = (mask > 1.0).float() * 2.0
        keep = float(mask.mean() / 2.0)
        assert 0.3 < keep < 0.7, keep
        masks.append(mask)
        seg.train_with_gradient(x.numpy(), g.numpy())
        gm = g * mask  # torch's step with the mask that was sent
        after = seg.parameters()
        assert np.abs(after["fc.weight"] - (before["fc.weight"] - 0.1 * (gm.T @ x).numpy())).max() <= TOL
        assert np.abs(after["fc.bias"] - (before["fc.bias"] - 0.1 * gm.sum(0).numpy())).max() <= TOL
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.parametrize("variant", ["flex", "builtin"])
def test_two_dropout_layers_draw_different_masks(variant: str, tmp_path: Path) -> None:
    """Two same-shaped Dropout layers of one segment start their seeds apart (a value of each name), so at every
    step their masks differ; the step trains on both masks that were sent, and both seeds advance."""
    torch.manual_seed(0)
    model = TwoDropouts()
    export_tflite_segment(fx.symbolic_trace(model), (8, 12), tmp_path, is_last=False, variants=(variant,),  # type: ignore[arg-type]
                          batch_size=8, optimizer={"name": "sgd", "lr": 0.1})
    seg = TfliteSegment.from_directory(tmp_path, variant=variant)  # type: ignore[arg-type]
    first = {k: float(seg.state()[f"{k}/seed"][0]) for k in ("d1", "d2")}
    assert first["d1"] != first["d2"], first
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        assert {k: float(seg.state()[f"{k}/seed"][0]) for k in first} == {k: v + step for k, v in first.items()}
        x = torch.randn(8, 12, generator=gen)
        g = torch.randn(8, 32, generator=gen)
        before = seg.parameters()
        sent = torch.from_numpy(seg.forward(x.numpy()))
        h = torch.nn.functional.linear(x, torch.from_numpy(before["fc.weight"]), torch.from_numpy(before["fc.bias"]))
        mask = (sent.abs() > 1e-6).float() * 2.0
        assert (sent - torch.cat([h, h], 1) * mask).abs().max() <= TOL
        m1, m2 = mask.split(16, 1)
        same = float((m1 == m2).float().mean())
        assert same < 0.75, (step, same)  # independent Bernoulli(0.5) masks agree on ~half (128 elements)
        seg.train_with_gradient(x.numpy(), g.numpy())
        g1, g2 = g.split(16, 1)
        gh = g1 * m1 + g2 * m2  # torch's step with both masks that were sent
        after = seg.parameters()
        assert np.abs(after["fc.weight"] - (before["fc.weight"] - 0.1 * (gh.T @ x).numpy())).max() <= TOL
        assert np.abs(after["fc.bias"] - (before["fc.bias"] - 0.1 * gh.sum(0).numpy())).max() <= TOL


def test_dropout_sites_of_a_segment_never_hash_alike() -> None:
    """80 Dropout layers (names that collide mod 1009, so the start moves on), then an encoder layer with 4 sites:
    every site hashes with its own seed (mod 1009); both readers agree; more than 1009 masks are refused."""
    from splitexport.export._layergraph import layer_graph
    from splitexport.export.ops._tfshared import SITES

    class Many(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.drops = nn.ModuleList(nn.Dropout(0.1) for _ in range(n))
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for drop in self.drops:
                x = drop(x)
            return self.enc(x)  # type: ignore[no-any-return]

    import zlib
    starts = [zlib.crc32(f"drops.{i}".encode()) % 1009 for i in range(80)]
    assert len(set(starts)) < len(starts)  # the test needs a collision of the names' hashes
    graphs = [layer_graph(m, (2, 5, 8)) for m in (fx.symbolic_trace(Many(80)), torch.jit.script(Many(80)))]
    seeds = [[(lyr.kind, int(lyr.weights["seed"][0])) for lyr in g.layers if "seed" in lyr.weights] for g in graphs]
    assert seeds[0] == seeds[1] and len(seeds[0]) == 81
    hashed = [(s * SITES + k) % 1009 for kind, s in seeds[0] for k in (range(SITES) if kind == "encoder" else [0])]
    assert len(hashed) == 84 and len(set(hashed)) == len(hashed)
    with pytest.raises(ExportError, match=r"'drops\.1009' \(Dropout\): more dropout masks in one device segment"):
        layer_graph(fx.symbolic_trace(Many(1010)), (2, 5, 8))


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), (2, 4, 8, 8),
         r"'body\.0' \(Conv2d\): padding_mode='circular'"),
        (nn.LayerNorm([4, 8, 8]), (2, 4, 8, 8), r"'body\.0' \(LayerNorm\): only LayerNorm over the last"),
        (nn.Softmax(dim=1), (2, 4, 8, 8), r"'body\.0' \(Softmax\): Softmax is supported over the last"),
        (nn.AvgPool2d(2, padding=1), (2, 4, 8, 8), r"'body\.0' \(AvgPool2d\): only AvgPool2d without padding"),
        (nn.GroupNorm(2, 4, affine=False), (2, 4, 8, 8), r"'body\.0' \(GroupNorm\): only affine"),
    ],
)
def test_unsupported_settings_name_the_layer_in_one_line(layer: nn.Module, shape: tuple[int, ...], message: str,
                                                         tmp_path: Path) -> None:
    gm = fx.symbolic_trace(_wrap(layer))
    with pytest.raises(ExportError, match=message) as info:
        export_tflite_segment(gm, shape, tmp_path, is_last=True, variants=("flex",))
    assert "\n" not in str(info.value)


def _wrap(layer: nn.Module) -> nn.Module:
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(layer)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)  # type: ignore[no-any-return]

    return Wrap()


def test_builtin_refuses_exact_gelu_naming_the_layer(tmp_path: Path) -> None:
    gm = fx.symbolic_trace(_wrap(nn.GELU()))
    with pytest.raises(ExportError, match=r"'body\.0' \(GELU\): not supported by the builtin-ops TFLite variant "
                                          r"\(approximate='none' needs erf") as info:
        export_tflite_segment(gm, (4, 12), tmp_path, is_last=True, variants=("builtin",), batch_size=4)
    assert "\n" not in str(info.value)
