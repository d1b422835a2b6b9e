"""PSL: one B step over the concatenation of an iteration's batches; each client gets its local gradient."""

from __future__ import annotations

import torch

from splitexport import label_loss
from splitexport.strategies import PSL, StrategyConfig, make_strategy

from .conftest import client_batches, server_segment


def test_one_server_step_over_the_concatenated_batch(single_bundle) -> None:
    batch = client_batches(3)
    psl = make_strategy("psl", server_segment(single_bundle), StrategyConfig(num_clients=3, client_lr=0.05))
    reference = server_segment(single_bundle)  # the same B, trained once on the concatenation
    before = single_bundle.torch_segment("B")
    replies = psl.train_round(batch)
    _, grad, _ = reference.train_with_labels(torch.cat([x for x, _ in batch.values()]),
                                             torch.cat([y for _, y in batch.values()]))
    assert psl.server is not None
    for (name, p), q in zip(psl.server.module.named_parameters(), reference.module.parameters(), strict=True):
        assert torch.equal(p, q), name
    # one step, not three: the weights moved exactly once from where they started
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), reference.module.parameters(), strict=True))
    assert grad is not None and set(replies) == set(batch)
    # each client's gradient is dL_i/d(a_i) of its own mean loss at the pre-step weights (SGLR eq. 5)
    for name, (x, y) in batch.items():
        x_in = x.clone().requires_grad_(True)
        label_loss(before(x_in), y).backward()
        reply = replies[name]
        assert reply.grad is not None
        torch.testing.assert_close(reply.grad, x_in.grad, rtol=1e-5, atol=1e-7)
        assert reply.loss is not None and reply.output is not None and reply.output.shape == (8, 10)


def test_one_client_is_plain_split_learning(single_bundle) -> None:
    ((name, (x, y)),) = client_batches(1).items()
    psl = PSL(server_segment(single_bundle), StrategyConfig(num_clients=1, client_lr=0.05))
    reference = server_segment(single_bundle)
    reply = psl.train_round({name: (x, y)})[name]
    loss, grad, _ = reference.train_with_labels(x, y)
    assert reply.grad is not None and grad is not None
    assert torch.equal(reply.grad, grad) and reply.loss == loss


def test_double_split_round_trains_b_once_and_returns_local_gradients(double_bundle) -> None:
    gen = torch.Generator().manual_seed(1)
    acts = {f"c{i}": torch.rand(4 + 2 * i, 64, generator=gen) for i in range(3)}  # unequal batch sizes
    psl = PSL(server_segment(double_bundle), StrategyConfig(num_clients=3, client_lr=0.05))
    assert psl.server is not None
    before = double_bundle.torch_segment("B")  # B's initial weights, fresh
    outs = psl.forward_round(acts)
    grads_out = {c: torch.rand_like(o, generator=gen) for c, o in outs.items()}
    back = psl.backward_round(grads_out)
    total = sum(a.shape[0] for a in acts.values())
    # reference: B's loss sum_i (n_i / n) * <out_i, g_i>, one SGD step
    x = {c: a.clone().requires_grad_(True) for c, a in acts.items()}
    ref_loss = sum((a.shape[0] / total) * (before(x[c]) * grads_out[c]).sum() for c, a in acts.items())
    before.zero_grad()
    ref_loss.backward()  # type: ignore[union-attr]
    for c, a in acts.items():
        grad = x[c].grad
        assert grad is not None
        torch.testing.assert_close(back[c], grad * total / a.shape[0], rtol=1e-5, atol=1e-7)
    for p, q in zip(psl.server.module.parameters(), before.parameters(), strict=True):
        assert q.grad is not None
        torch.testing.assert_close(p, q - 0.05 * q.grad, rtol=1e-5, atol=1e-7)
