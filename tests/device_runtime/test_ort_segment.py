"""OrtSegment, the reference phone runtime, step by step against torch and the update rule."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from device_runtime import OrtRunner, OrtRuntimeError, OrtSegment
from splitexport import (
    LossSpec,
    OptimizerSpec,
    SourceSpec,
    SplitExportError,
    aux_loss,
    label_loss,
    load_bundle,
    partition,
    write_bundle,
)
from splitexport.export import export_onnx
from splitexport.models import mlp, resnet_cnn

LR = 0.05
SOURCE = SourceSpec(file_name="model.pt", sha256="0" * 64, kind="state_dict")
BATCHES = (1, 7, 32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    """ResNet-style CNN cut A | B | C (A: stem + layer1 with BatchNorm; C: pool, flatten, fc)."""
    torch.manual_seed(0)
    part = partition(resnet_cnn(), ["layer1", "layer3"], torch.zeros(2, 1, 8, 8))
    path = tmp_path_factory.mktemp("ort") / "bundle"
    b = write_bundle(part, path, source=SOURCE, optimizer=OptimizerSpec(name="sgd", lr=LR))
    return export_onnx(b, ort_format=True)


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def assert_state_equal(seg: OrtSegment, module: torch.nn.Module, tol: float) -> None:
    ours = seg.parameters()
    theirs = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        np.testing.assert_allclose(ours[k], v.numpy(), rtol=0, atol=tol, err_msg=k)


def test_forward_is_train_mode_and_leaves_statistics(bundle) -> None:
    seg = OrtSegment.from_bundle(bundle, "A")
    ref = bundle.torch_segment("A").train()
    before = seg.parameters()
    x = rand(7, 1, 8, 8)
    out = seg.forward(x)
    with torch.no_grad():
        expected = copy.deepcopy(ref)(torch.from_numpy(x)).numpy()  # train-mode BN on the batch statistics
    np.testing.assert_allclose(out, expected, atol=1e-5)
    after = seg.parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before), "forward changed the running statistics"
    assert not np.allclose(out, seg.evaluate(x), atol=1e-3)  # inference mode differs: the modes are real


@pytest.mark.parametrize("loaded_as", ["onnx", "ort"])
def test_train_with_gradient_is_the_aux_loss_step(bundle, loaded_as: str) -> None:
    """Same artifacts, batches of 1, 7 and 32: weights and BN statistics follow torch's aux-loss step."""
    seg = OrtSegment.from_bundle(bundle, "A", ort_format=loaded_as == "ort")
    assert seg.learning_rate == pytest.approx(LR) and seg.batch_size is None
    ref = bundle.torch_segment("A").train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for i, n in enumerate(BATCHES):
        x = rand(n, 1, 8, 8, seed=i)
        out = seg.forward(x)
        g = rand(*out.shape, seed=10 + i, scale=1e-2)
        seg.train_with_gradient(x, g)
        t_out = ref(torch.from_numpy(x))
        opt.zero_grad()
        aux_loss(t_out, torch.from_numpy(g)).backward()  # the canonical rule
        opt.step()
        assert_state_equal(seg, ref, tol=2e-6)
    ref.eval()
    x = rand(5, 1, 8, 8, seed=99)
    with torch.no_grad():
        np.testing.assert_allclose(seg.evaluate(x), ref(torch.from_numpy(x)).numpy(), atol=1e-5)


@pytest.mark.parametrize("loaded_as", ["onnx", "ort"])
def test_train_with_labels_returns_loss_and_input_gradient(bundle, loaded_as: str) -> None:
    seg = OrtSegment.from_bundle(bundle, "C", ort_format=loaded_as == "ort")
    ref = bundle.torch_segment("C").train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for i, n in enumerate(BATCHES):
        x = rand(n, 32, 4, 4, seed=i)
        y = np.random.default_rng(i).integers(0, 10, size=n)
        loss, grad_in = seg.train_with_labels(x, y)
        xt = torch.from_numpy(x).requires_grad_(True)
        out = ref(xt)
        t_loss = label_loss(out, torch.from_numpy(y))
        opt.zero_grad()
        t_loss.backward()
        opt.step()
        assert loss == pytest.approx(float(t_loss.detach()), abs=1e-6)
        assert grad_in.shape == x.shape
        assert xt.grad is not None
        np.testing.assert_allclose(grad_in, xt.grad.numpy(), atol=1e-7)
        assert seg.last_output is not None
        np.testing.assert_allclose(seg.last_output, out.detach().numpy(), atol=1e-5)
        assert_state_equal(seg, ref, tol=1e-6)


def test_mse_loss_segment(tmp_path: Path) -> None:
    torch.manual_seed(0)
    part = partition(mlp(), ["relu1", "relu2"], torch.zeros(2, 1, 8, 8))
    b = write_bundle(part, tmp_path / "b", source=SOURCE, loss=LossSpec(kind="mse"), optimizer=OptimizerSpec(lr=0.1))
    export_onnx(b)
    seg = OrtSegment.from_bundle(b, "C")
    ref = b.torch_segment("C")
    x, y = rand(6, 64), rand(6, 10, seed=1)
    loss, grad_in = seg.train_with_labels(x, y)
    xt = torch.from_numpy(x).requires_grad_(True)
    t_loss = label_loss(ref(xt), torch.from_numpy(y), "mse")
    t_loss.backward()
    assert loss == pytest.approx(float(t_loss.detach()), rel=1e-6)
    assert xt.grad is not None
    np.testing.assert_allclose(grad_in, xt.grad.numpy(), atol=1e-7)
    assert float(F.mse_loss(ref(xt), torch.from_numpy(y)).detach()) == pytest.approx(float(t_loss.detach()))


def test_checkpoint_restores_the_training_state(bundle, tmp_path: Path) -> None:
    seg = OrtSegment.from_bundle(bundle, "C")
    x, y = rand(8, 32, 4, 4), np.arange(8) % 10
    for _ in range(3):
        seg.train_with_labels(x, y)
    path = seg.save_checkpoint(tmp_path / "ckpt" / "C.ckpt")
    restored = OrtSegment.from_bundle(bundle, "C", checkpoint=path)
    fresh = OrtSegment.from_bundle(bundle, "C")
    for k, v in seg.parameters().items():
        np.testing.assert_array_equal(restored.parameters()[k], v)
        assert not np.array_equal(fresh.parameters()[k], v)
    assert restored.train_with_labels(x, y)[0] == seg.train_with_labels(x, y)[0]


def test_export_inference_model(bundle, tmp_path: Path) -> None:
    seg = OrtSegment.from_bundle(bundle, "A")
    x = rand(4, 1, 8, 8)
    seg.train_with_gradient(x, rand(*seg.forward(x).shape, seed=3, scale=1e-2))
    path = seg.export_inference_model(tmp_path / "A_inference.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]  # weights are baked in
    (out,) = session.run(None, {"input": x})
    np.testing.assert_allclose(out, seg.evaluate(x), atol=1e-6)


def test_set_learning_rate(bundle) -> None:
    seg = OrtSegment.from_bundle(bundle, "C", learning_rate=0.5)
    assert seg.learning_rate == pytest.approx(0.5)
    seg.set_learning_rate(0.0125)
    ref = bundle.torch_segment("C")
    opt = torch.optim.SGD(ref.parameters(), lr=0.0125)
    x, y = rand(4, 32, 4, 4), np.array([1, 2, 3, 4])
    seg.train_with_labels(x, y)
    label_loss(ref(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    opt.step()
    assert_state_equal(seg, ref, tol=1e-7)
    with pytest.raises(OrtRuntimeError, match="positive"):
        seg.set_learning_rate(0.0)


def test_misuse_is_reported(bundle, tmp_path: Path) -> None:
    a = OrtSegment.from_bundle(bundle, "A")
    c = OrtSegment.from_bundle(bundle, "C")
    x = rand(2, 1, 8, 8)
    with pytest.raises(OrtRuntimeError, match="train_with_gradient"):
        a.train_with_labels(x, np.array([0, 1]))
    with pytest.raises(OrtRuntimeError, match="train_with_labels"):
        c.train_with_gradient(rand(2, 32, 4, 4), rand(2, 10))
    with pytest.raises(OrtRuntimeError, match=r"shape \(batch, 1, 8, 8\)"):
        a.forward(rand(2, 1, 8, 9))
    with pytest.raises(OrtRuntimeError, match="gradient batch 3 != input batch 2"):
        a.train_with_gradient(x, rand(3, 16, 8, 8))
    with pytest.raises(OrtRuntimeError, match="runs on the server"):
        OrtSegment.from_bundle(bundle, "B")
    torch.manual_seed(0)
    plain = write_bundle(partition(mlp(), ["relu1"], torch.zeros(2, 1, 8, 8)), tmp_path / "plain", source=SOURCE)
    with pytest.raises(OrtRuntimeError, match="splitexport export .* --format onnx"):
        OrtSegment.from_bundle(plain, "A")


def test_runner_checks_the_optimizer(bundle) -> None:
    runner = OrtRunner.from_bundle(bundle, "A", optimizer=OptimizerSpec(name="sgd", lr=0.01))
    assert runner.segment.learning_rate == pytest.approx(0.01)
    with pytest.raises(SplitExportError, match="--optimizer"):
        OrtRunner.from_bundle(load_bundle(bundle.path), "A", optimizer=OptimizerSpec(name="sgd", lr=0.01, momentum=0.9))
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        runner.train_with_gradient(torch.zeros(1, 16, 8, 8))


def test_threads_option_trains_like_the_default(bundle) -> None:
    """``threads=1``: a one-thread, non-spinning ORT pool; the same step as ORT's default pool."""
    one = OrtRunner.from_bundle(bundle, "A", threads=1).segment
    default = OrtSegment.from_bundle(bundle, "A")
    assert one.threads == 1 and default.threads is None
    x = rand(32, 1, 8, 8)
    out = one.forward(x)
    np.testing.assert_allclose(out, default.forward(x), atol=1e-6)
    g = rand(*out.shape, seed=1, scale=1e-2)
    one.train_with_gradient(x, g)
    default.train_with_gradient(x, g)
    for k, v in default.parameters().items():
        np.testing.assert_allclose(one.parameters()[k], v, rtol=0, atol=1e-6, err_msg=k)
