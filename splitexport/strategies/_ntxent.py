"""AdaSplit's client-local objective: supervised NT-Xent on a projection head of the cut activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def projection_head(in_features: int, hidden: int = 64, out_features: int = 32) -> nn.Module:
    """The projection ``H`` the device trains beside its segment (it never leaves the device)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


def supervised_nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """AdaSplit eq. 5: ``-log exp(q_i.q_+/tau) / sum_{j != i} exp(q_i.q_j/tau)`` over same-label pairs.

    Embeddings are L2-normalised; the loss is averaged over positive pairs per anchor
    and over anchors that have one (the paper writes plain sums, which scale with the
    batch and would need a different learning rate per batch size).
    """
    q = F.normalize(embeddings.flatten(1), dim=1)
    n = q.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=q.device)
    sim = (q @ q.T / tau).masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    count = positives.sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return (q * 0).sum()
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has] / count[has]
    return per_anchor.mean()
