import torch

from splitexport import EXACT_RULE, AuxLossRule, aux_loss, aux_target, label_loss


def test_aux_loss_gradient_is_the_received_gradient_exactly() -> None:
    torch.manual_seed(0)
    out = (torch.randn(16, 32) * 3).requires_grad_()
    # |g| ~ 1e-6 << |out| ~ 3: float32 cancellation would lose most of g's bits;
    # in float64 it is exact while |g| / |out| > 2**-29 (documented bound)
    g = torch.sign(torch.randn(16, 32)) * (1 + torch.rand(16, 32)) * 1e-6
    aux_loss(out, g).backward()
    assert out.grad is not None
    assert torch.equal(out.grad, g)
    out32 = out.detach()
    assert not torch.equal(out32 - (out32 - g), g)  # the float32 form is not exact


def test_target_is_out_minus_g_and_detached() -> None:
    out = torch.tensor([1.0, 2.0], requires_grad=True)
    g = torch.tensor([0.25, -0.5])
    t = aux_target(out, g)
    assert not t.requires_grad
    assert torch.allclose(t, torch.tensor([0.75, 2.5], dtype=torch.float64))
    assert float(EXACT_RULE.loss(out, t).detach()) == 0.5 * (0.25**2 + 0.5**2)


def test_seed_variants_give_wrong_gradients() -> None:
    out = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    AuxLossRule(sign=-1.0).loss_from_grad(out, g).backward()  # SplitEasy paper: t = out + g
    assert out.grad is not None and torch.allclose(out.grad, -g)
    out.grad = None
    AuxLossRule(scale=1.0).loss_from_grad(out, g).backward()  # SplitEasy code: sum-MSE without 0.5
    assert out.grad is not None and torch.allclose(out.grad, 2 * g)


def test_label_losses_are_mean_reduced() -> None:
    logits = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    assert torch.allclose(label_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    pred, target = torch.randn(8, 1), torch.randn(8)
    assert torch.allclose(label_loss(pred, target, "mse"), ((pred[:, 0] - target) ** 2).mean())


def test_shape_mismatch_is_refused() -> None:
    try:
        aux_target(torch.zeros(2, 3), torch.zeros(3, 2))
    except ValueError as exc:
        assert "shape" in str(exc)
    else:
        raise AssertionError("mismatched gradient accepted")
