"""Sequence layers train on the device like torch: TFLite flex, builtin (or its refusal) and TF.js, 20 steps.

Per case (:mod:`tests.splitexport.export.seq_cases`): before each step the device gets torch's
state; after it, weights and input gradients must be within 1e-5 of torch. Free-running (20 steps
from the exported weights) is asserted too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from tests.splitexport.export.seq_cases import EMB, SEQ_CASES, D, T
from tests.tf_reference import BATCH, STATS_TOL, STEPS, TOL, Case, Reference, reference

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow")

from splitexport._errors import ExportError
from splitexport.export._tflite import export_tflite_segment

_REFERENCES: dict[str, Reference] = {}


def _cached(case: Case) -> Reference:
    if case.name not in _REFERENCES:
        _REFERENCES[case.name] = reference(case)
    return _REFERENCES[case.name]


@pytest.mark.parametrize("variant", ["flex", "builtin"])
@pytest.mark.parametrize("case", SEQ_CASES, ids=[c.name for c in SEQ_CASES])
def test_seq_tflite_matches_torch(case: Case, variant: str, tmp_path: Path) -> None:
    check_tflite(case, variant, tmp_path)


def test_seq_tfjs_matches_torch(tmp_path: Path) -> None:
    """Every case in the JS runtime (node's equivalence test on fixtures from the real exporter)."""
    check_tfjs(SEQ_CASES, tmp_path)


def check_tflite(case: Case, variant: str, tmp_path: Path) -> float | str:
    """Export ``case`` as TFLite ``variant`` and compare 20 steps with torch (or check the builtin refusal).

    Returns the largest per-step difference, or the refusal message."""
    from device_runtime._tflite import TfliteSegment
    from tests.device_runtime.test_tflite_runtime import _free_running, _per_step, _report

    ref = _cached(case)
    kwargs = {"is_last": ref.is_last, "optimizer": case.optimizer, "loss": case.loss,
              "input_dtype": case.input_dtype, "variants": (variant,), "batch_size": BATCH}
    if variant == "builtin" and not case.builtin:
        with pytest.raises(ExportError, match=r"^layer '[\w.]+' \((GRU|LSTM|MultiheadAttention|TransformerEncoderLayer)\)"
                                              r": not supported by the builtin-ops TFLite variant .*use the flex") as info:
            export_tflite_segment(ref.module, ref.input_shape, tmp_path, **kwargs)  # type: ignore[arg-type]
        assert not list(tmp_path.iterdir())  # nothing written
        return str(info.value)
    export_tflite_segment(ref.module, ref.input_shape, tmp_path, **kwargs)  # type: ignore[arg-type]
    seg = TfliteSegment.from_directory(tmp_path, variant=variant)  # type: ignore[arg-type]
    free = _free_running(seg, ref)
    step = _per_step(seg, ref)
    print(f"\n{case.name} tflite-{variant} {STEPS} steps | {_report('free-running', free)} | {_report('per step', step)}")
    assert step["weights"] <= TOL and step["grad_input"] <= TOL, step
    assert free["forward"] <= TOL and free["loss_rel"] <= TOL, free
    assert free["weights"] <= TOL and free["grad_input"] <= TOL and free["running_stats"] <= STATS_TOL, free
    assert free["evaluate"] <= 10 * TOL, free
    return max(step.values())


def check_tfjs(cases: list[Case], tmp_path: Path) -> dict[str, float]:
    """Every case in the JS runtime (node's equivalence test on fixtures from the real exporter); the largest
    per-step difference by case name."""
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    pytest.importorskip("tensorflowjs")
    from tests.device_runtime.tfjs_fixtures import run_js_equivalence

    rows = run_js_equivalence(cases, tmp_path)
    for case in cases:
        r = rows[case.name]
        print(f"\n{case.name} tfjs: free-running {r['free']} | per step {r['per_step']}")
        assert max(r["per_step"].values()) <= TOL
        assert r["free"]["weights"] <= TOL and r["free"]["grad_input"] <= TOL
    return {case.name: float(max(rows[case.name]["per_step"].values())) for case in cases}


# ---------------------------------------------------------------------------------------- dropout inside attention

P_DROP = 0.3


class DropEncoder(nn.Module):
    """A TransformerEncoderLayer with every dropout site active (attention weights, feed-forward, both residuals)."""

    def __init__(self, activation: str = "relu", norm_first: bool = False, p: float = P_DROP) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=p, activation=activation, batch_first=True,
                                              norm_first=norm_first)

    sites: ClassVar = {0: (BATCH, 2, T, T), 1: (BATCH, T, 16), 2: (BATCH, T, D), 3: (BATCH, T, D)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)  # type: ignore[no-any-return]

    def with_masks(self, x: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        return encoder_ref(self.enc, x, masks)


class DropAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, dropout=P_DROP, batch_first=True)

    sites: ClassVar = {0: (BATCH, 2, T, T)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]  # type: ignore[no-any-return]

    def with_masks(self, x: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        return attention_ref(self.attn, x, masks.get(0))


class _FlatDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(P_DROP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)  # type: ignore[no-any-return]


_FLAT = BATCH * T * 16
"""Elements of the largest site's mask (the feed-forward's, N x T x 16)."""


@pytest.fixture(scope="module")
def tflite_masks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``masks(seed, shapes)``: the masks of the dropout sites at the layer seed ``seed``, drawn by TFLite itself.

    Site k hashes with the seed ``seed * 4 + k`` (mod 1009); the masks come from a plain Dropout(P_DROP) exported as
    TFLite flex (site 0 of its layer: hash seed ``4 * its seed``), its seed set so that it hashes alike, run on ones (batch 1: the hash index is the flat element index of the
    N x ... site tensor). The same kernels as the device's, so no rounding difference from TensorFlow's own sin
    (which flips ~0.1% of the mask elements) enters."""
    from device_runtime._tflite import TfliteSegment
    from splitexport.export.ops._tfshared import SITES

    out = tmp_path_factory.mktemp("flat_dropout")
    export_tflite_segment(fx.symbolic_trace(_FlatDropout()), (1, _FLAT), out, is_last=False, variants=("flex",))
    seg = TfliteSegment.from_directory(out, variant="flex")

    def masks(seed: int, shapes: dict[int, tuple[int, ...]]) -> dict[int, torch.Tensor]:
        result = {}
        for site, shape in shapes.items():
            state = seg.state()
            # 4 * d = 4 * seed + site (mod 1009): d = seed + site / 4 in the integers mod 1009
            state["drop/seed"] = np.array([(seed + site * pow(SITES, -1, 1009)) % 1009], np.float32)
            seg.load_state(state)
            flat = seg.forward(np.ones((1, _FLAT), np.float32))[0]
            result[site] = torch.from_numpy(flat[: int(np.prod(shape))].reshape(shape).copy())
        return result

    return masks


def attention_ref(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``attn(x, x, x)[0]`` with ``mask`` (N, H, T, T) on the attention weights in place of torch's dropout."""
    n, t, e = x.shape
    h = attn.num_heads
    q, k, v = (p.reshape(n, t, h, e // h).transpose(1, 2)
               for p in F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // h), -1)
    if mask is not None:
        a = a * mask
    return attn.out_proj((a @ v).transpose(1, 2).reshape(n, t, e))  # type: ignore[no-any-return]


def encoder_ref(layer: nn.TransformerEncoderLayer, x: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """The encoder layer with ``masks`` at its dropout sites (0 attention weights, 1 feed-forward, 2 dropout1,
    3 dropout2) in place of torch's dropouts."""

    def drop(h: torch.Tensor, site: int) -> torch.Tensor:
        return h * masks[site] if site in masks else h

    act = F.relu if layer.activation_relu_or_gelu == 1 else F.gelu

    def sa(h: torch.Tensor) -> torch.Tensor:
        return drop(attention_ref(layer.self_attn, h, masks.get(0)), 2)

    def ff(h: torch.Tensor) -> torch.Tensor:
        return drop(layer.linear2(drop(act(layer.linear1(h)), 1)), 3)

    if layer.norm_first:
        x = x + sa(layer.norm1(x))
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + sa(x))
    return layer.norm2(x + ff(x))  # type: ignore[no-any-return]


def test_stacked_attention_layers_draw_different_masks() -> None:
    """Every attention layer of a segment starts its seed elsewhere (CRC32 of its name, moved on past the others),
    so no two of their sites hash with the same seed at any step; the readers agree on it."""
    from splitexport.export._layergraph import layer_graph
    from splitexport.export.ops._tfshared import SITES

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.e3, self.e4 = (nn.TransformerEncoderLayer(D, 2, 16, dropout=0.1, batch_first=True)
                                                  for _ in range(4))
            self.attn = nn.MultiheadAttention(D, 2, dropout=0.1, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.e4(self.e3(self.e2(self.e1(x))))
            return self.attn(h, h, h, need_weights=False)[0]

    graphs = [layer_graph(m, EMB) for m in (fx.symbolic_trace(Stack()), torch.jit.script(Stack()))]
    seeds = [[int(lyr.weights["seed"][0]) for lyr in g.layers if "seed" in lyr.weights] for g in graphs]
    assert seeds[0] == seeds[1] and len(seeds[0]) == 5
    hashed = [(s * SITES + k) % 1009 for s in seeds[0] for k in range(SITES)]
    assert len(set(hashed)) == len(hashed), seeds[0]


DROP_CASES: dict[str, tuple[Callable[[], DropEncoder | DropAttention], bool]] = {
    "encoder_A": (DropEncoder, False),
    "encoder_gelu_nf_C": (lambda: DropEncoder("gelu", True), True),
    "attention_A": (DropAttention, False),
}


@pytest.mark.parametrize("name", list(DROP_CASES))
def test_attention_dropout_trains_on_the_masks_it_sent(name: str, tflite_masks: Any, tmp_path: Path) -> None:
    """TFLite flex, dropout 0.3 at every site: forward() (the activation sent) and the training step use the masks
    of the layer's seed (site k: hash seed seed*4+k), i.e. torch with those masks, to 1e-5 (A: the sent output and
    the weights after the step; C: the weights and dL/d(input) sent upstream); the next step draws new masks."""
    from device_runtime._tflite import TfliteSegment

    factory, is_last = DROP_CASES[name]
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():
        x0 = torch.randn(EMB)
        assert torch.allclose(model.with_masks(x0, {}), model.eval()(x0), atol=1e-6)  # no masks: torch's eval
    model.train()
    lr = 0.02  # small enough that the attention-only model's outputs stay O(1) (float rounding << 1e-5)
    export_tflite_segment(fx.symbolic_trace(model), EMB, tmp_path, is_last=is_last, loss="mse",
                          optimizer={"name": "sgd", "lr": lr}, variants=("flex",))
    with pytest.raises(ExportError, match=r"not supported by the builtin-ops TFLite variant"):
        export_tflite_segment(fx.symbolic_trace(model), EMB, tmp_path / "b", is_last=is_last, loss="mse",
                              variants=("builtin",), batch_size=BATCH)
    seg = TfliteSegment.from_directory(tmp_path, variant="flex")
    (seed_key,) = [k for k in seg.state() if k.endswith("/seed")]
    first = int(seg.state()[seed_key][0])  # the layer's start (a function of its name)
    gen = torch.Generator().manual_seed(1)
    seen: list[dict[int, torch.Tensor]] = []
    for step in range(3):
        assert seg.state()[seed_key][0] == first + step  # one advance per training step
        x = torch.randn(EMB, generator=gen)
        target = torch.randn(EMB, generator=gen)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in seg.parameters().items()})
        model.zero_grad()
        masks = tflite_masks(first + step, model.sites)
        for site, mask in masks.items():
            keep = float((mask > 0).float().mean())
            assert abs(keep - (1 - P_DROP)) < 0.1, (site, keep)
        xr = x.clone().requires_grad_(True)
        out = model.with_masks(xr, masks)
        if is_last:
            F.mse_loss(out, target).backward()
            _, gx = seg.train_with_labels(x.numpy(), target.numpy())
            assert xr.grad is not None
            assert np.abs(gx - xr.grad.numpy()).max() <= TOL
        else:
            sent = seg.forward(x.numpy())
            assert np.array_equal(sent, seg.forward(x.numpy()))  # forward has no side effects
            assert np.abs(sent - out.detach().numpy()).max() <= TOL, "the sent activation is not torch's with the masks"
            (out * target).sum().backward()  # the aux-loss gradient: target plays dL/d(output)
            seg.train_with_gradient(x.numpy(), target.numpy())
        after = seg.parameters()
        for k, p in model.named_parameters():
            assert p.grad is not None
            expected = (p - lr * p.grad).detach().numpy()
            assert np.abs(after[k] - expected).max() <= TOL, f"step {step}: {k} is not torch's step with the masks"
        seen.append(masks)
    assert all(not torch.equal(seen[i][0], seen[i + 1][0]) for i in range(2))
    if 3 in seen[0]:
        assert not torch.equal(seen[0][2], seen[0][3])  # two sites of one shape: different masks


class DropHead(nn.Module):
    """A last segment: TransformerEncoderLayer(dropout 0.1) -> mean over time -> Linear (test_onnx_ops.py's)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(x).mean(dim=1))  # type: ignore[no-any-return]


CONVERGE_STEPS = 80


def converge_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of the toy task: is the first feature's mean over time positive?"""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, T, D, generator=gen)
    return x, (x[:, :, 0].mean(dim=1) > 0).long()


@pytest.mark.parametrize("role", ["A", "C"])
def test_attention_dropout_trains_and_converges_tflite_flex(role: str, tmp_path: Path) -> None:
    """Dropout 0.1 inside a TransformerEncoderLayer, TFLite flex. A: the encoder layer, trained on the gradient a
    torch head (playing the server) sends back; C: encoder + mean + Linear trained on labels. Cross-entropy over the
    last 10 of 80 steps (batch 16, SGD lr 0.1) is below 0.7x the first 10's."""
    from device_runtime._tflite import TfliteSegment

    torch.manual_seed(0)
    model: nn.Module = DropHead() if role == "C" else DropEncoder(p=0.1)
    export_tflite_segment(fx.symbolic_trace(model), (16, T, D), tmp_path, is_last=role == "C",
                          optimizer={"name": "sgd", "lr": 0.1}, variants=("flex",))
    seg = TfliteSegment.from_directory(tmp_path, variant="flex")
    before = seg.parameters()["enc.self_attn.in_proj_weight"]
    head = nn.Linear(T * D, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    losses = []
    for step in range(CONVERGE_STEPS):
        x, y = converge_data(step)
        if role == "C":
            loss, gx = seg.train_with_labels(x.numpy(), y.numpy())
            assert np.isfinite(gx).all()
        else:
            out = torch.from_numpy(seg.forward(x.numpy())).requires_grad_(True)
            ce = F.cross_entropy(head(out.flatten(1)), y)
            opt.zero_grad()
            ce.backward()
            opt.step()
            assert out.grad is not None
            seg.train_with_gradient(x.numpy(), out.grad.numpy())
            loss = ce.item()
        losses.append(loss)
    assert np.abs(seg.parameters()["enc.self_attn.in_proj_weight"] - before).max() > 1e-3  # the device trained
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    print(f"\nattention dropout 0.1 in {role} (TFLite flex): cross-entropy {first:.3f} (first 10 steps) -> {last:.3f} "
          f"(last 10 of {CONVERGE_STEPS})")
    assert last < 0.7 * first, (first, last)


def test_attention_dropout_tfjs(tmp_path: Path) -> None:
    """The JS runtime on the exporter's TF.js artifacts (device_runtime/js/test/attention_dropout.test.js): with
    dropout 0.3 the sent activation, the weights after each step and C's dL/d(input) equal the layer's math with
    the masks of its seed (site k: seed * 4 + k), 3 steps (encoder A, encoder gelu norm_first C, attention A); with
    dropout 0.1 A (a JS head playing the server) and C (encoder + mean + Linear) converge in 80 steps."""
    import shutil
    import subprocess

    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    pytest.importorskip("tensorflowjs")
    from splitexport.export._layergraph import layer_graph
    from splitexport.export._tfjs import write_tfjs
    from tests.device_runtime.tfjs_fixtures import JS

    node = shutil.which("node")
    assert node, "node (>= 18) is required for the JS device runtime tests"
    torch.manual_seed(0)
    models: dict[str, tuple[nn.Module, bool, str, float]] = {
        "mask_A": (DropEncoder(), False, "mse", 0.02),
        "mask_C": (DropEncoder("gelu", True), True, "mse", 0.02),
        "attention_A": (DropAttention(), False, "mse", 0.02),
        "conv_A": (DropEncoder(p=0.1), False, "cross_entropy", 0.1),
        "conv_C": (DropHead(), True, "cross_entropy", 0.1),
    }
    for name, (model, is_last, loss, lr) in models.items():
        graph = layer_graph(fx.symbolic_trace(model), EMB)
        write_tfjs(graph, tmp_path / name, is_last=is_last, loss=loss, optimizer={"name": "sgd", "lr": lr})
    env = {**os.environ, "SPLITEXPORT_TFJS_DROPOUT_MODELS": str(tmp_path)}
    proc = subprocess.run([node, "--test", "test/attention_dropout.test.js"], cwd=JS, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    print("\n" + "\n".join(line for line in proc.stdout.splitlines() if "cross-entropy" in line))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.stdout.count("\nok ") == 5 and "(exported)" in proc.stdout
