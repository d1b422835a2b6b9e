"""Leakage at a cut, measured by an honest-but-curious server's attacks (``splitexport plan --attack``).

- Input reconstruction (model inversion, He et al. 2019): the server trains a decoder from the activations at the
  cut back to the inputs on half of the data (its auxiliary data) and reconstructs the other half; reported as
  PSNR and, for images, SSIM (7x7 uniform windows, as scikit-image's default) against the real inputs.
- Token recovery (inputs that are token ids): the same attack with a decoder predicting each position's token id
  from the activations; reported as token accuracy next to the majority baseline (each position's most frequent
  token in the server's half).
- Label leakage from the returned gradients (single split; Li et al. 2021, cosine attack): gradients of samples
  with the same label point in similar directions; the AUC of the cosine similarity of two samples' gradients for
  telling same-label pairs from different-label pairs (0.5: nothing leaks, 1: labels fully recoverable).

Both attack the model as loaded (its weights as given); ``noise`` adds the activation noise of the defence to what
the server sees. docs/privacy.md has the assumptions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._partition import partition


@dataclass(frozen=True)
class Leakage:
    psnr_db: float | None
    """``None`` for token inputs."""
    ssim: float | None
    """``None`` for inputs that are not images (fewer than two spatial dims) and for token inputs."""
    label_auc: float | None
    """``None`` for a double split (the labels stay on the device)."""
    token_accuracy: float | None = None
    """Token inputs: the share of positions whose token id the decoder recovers (held-out half)."""
    token_baseline: float | None = None
    """Token inputs: the same for the majority guess (each position's most frequent token in the server's half)."""


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> float:
    mse = float(F.mse_loss(x, ref))
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float, win: int = 7) -> float:
    """Mean SSIM of ``N x C x H x W`` images with ``win x win`` uniform windows (whole image if smaller)."""
    k = min(win, x.shape[-1], x.shape[-2])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, k, stride=1)

    mx, my = pool(x), pool(ref)
    n = k * k
    cov = n / (n - 1)  # sample covariances, as scikit-image
    vx = cov * (pool(x * x) - mx * mx)
    vy = cov * (pool(ref * ref) - my * my)
    vxy = cov * (pool(x * ref) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve (ties counted half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive.numpy(), scores.numpy()))


@contextmanager
def _one_thread() -> Iterator[None]:
    """The decoders are small: one intra-op thread is fastest, and many times faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def invert(acts: torch.Tensor, x: torch.Tensor, *, epochs: int = 40, seed: int = 0) -> torch.Tensor:
    """Train an MLP decoder activations -> inputs on the first half, return its reconstructions of the second."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    half = x.shape[0] // 2
    a = acts.flatten(1)
    a = (a - a[:half].mean(0)) / (a[:half].std() + 1e-6)  # one scale: a dead unit must not blow up
    target = x.flatten(1)
    decoder = nn.Sequential(nn.Linear(a.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                            nn.Linear(256, target.shape[1]))
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    with _one_thread():
        _fit_invert(decoder, opt, a, target, half, epochs, g)
    with torch.no_grad():
        return decoder(a[half:]).reshape(x[half:].shape)


def _fit_invert(decoder: nn.Module, opt: torch.optim.Optimizer, a: torch.Tensor, target: torch.Tensor, half: int,
                epochs: int, g: torch.Generator) -> None:
    for _ in range(epochs):
        for idx in torch.randperm(half, generator=g).split(64):
            loss = F.mse_loss(decoder(a[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def recover_tokens(acts: torch.Tensor, ids: torch.Tensor, *, epochs: int = 40, seed: int = 0,
                   vocab: int | None = None) -> tuple[float, float]:
    """Train an MLP decoder activations -> every position's token id (cross-entropy) on the first half; return
    (its token accuracy, the per-position majority baseline's) on the second half.

    Activations that keep the sequence (``N x L x ...`` with the input's ``L`` positions) are decoded position by
    position with one decoder shared by all positions (an embedding inversion); others (pooled) as a whole.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    half = ids.shape[0] // 2
    flat_ids = ids.flatten(1).long()
    positions = flat_ids.shape[1]
    v = int(vocab if vocab is not None else int(flat_ids.max()) + 1)
    per_position = acts.dim() >= 3 and acts.shape[1] == positions
    a = acts.reshape(acts.shape[0], positions, -1) if per_position else acts.flatten(1).unsqueeze(1)
    a = a.float()
    a = (a - a[:half].mean(0)) / (a[:half].std() + 1e-6)
    width = 1 if per_position else positions  # token ids each decoder row predicts
    decoder = nn.Sequential(nn.Linear(a.shape[2], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                            nn.Linear(256, width * v))
    targets = flat_ids.reshape(ids.shape[0], -1, width)  # rows of the decoder x the ids each predicts
    rows, cols = a[:half].reshape(-1, a.shape[2]), targets[:half].reshape(-1, width)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    with _one_thread():
        for _ in range(epochs):
            for idx in torch.randperm(rows.shape[0], generator=g).split(64):
                logits = decoder(rows[idx]).reshape(-1, width, v)
                loss = F.cross_entropy(logits.transpose(1, 2), cols[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        pred = decoder(a[half:].reshape(-1, a.shape[2])).reshape(-1, width, v).argmax(2).reshape(-1, positions)
    test = flat_ids[half:]
    majority = torch.mode(flat_ids[:half], dim=0).values
    return float((pred == test).float().mean()), float((majority.unsqueeze(0) == test).float().mean())


def cut_gradients(head: nn.Module, tail: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``dL/d(activation)`` the server returns to the device (cross-entropy, training mode);
    ``noise``: added to the activation as the device sends it."""
    head, tail = copy.deepcopy(head).train(), copy.deepcopy(tail).train()
    with torch.no_grad():
        act = head(x)
        if noise is not None:
            act = act + noise
    act.requires_grad_(True)
    F.cross_entropy(tail(act), y, reduction="sum").backward()
    assert act.grad is not None
    return act.grad.flatten(1)


def label_leakage_auc(grads: torch.Tensor, y: torch.Tensor, pairs: int = 20000, seed: int = 0) -> float:
    """AUC of the gradients' cosine similarity for same-label vs different-label pairs of samples."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, grads.shape[0], (pairs,), generator=g)
    j = torch.randint(0, grads.shape[0], (pairs,), generator=g)
    keep = i != j
    cos = F.cosine_similarity(grads[i[keep]], grads[j[keep]], dim=1)
    return auc(cos, (y[i[keep]] == y[j[keep]]).long())


def measure(model: nn.Module, cuts: tuple[str, ...], example: torch.Tensor, x: torch.Tensor,
            y: torch.Tensor | None, *, epochs: int = 40, noise: float = 0.0, seed: int = 0) -> Leakage:
    """The leakage at ``cuts`` (the activations leaving the device: after A) on inputs ``x`` and labels ``y``.

    ``noise``: the std of the defence's activation noise (drawn with ``seed``) on what the server sees.
    Integer ``x`` (token ids): token recovery instead of PSNR/SSIM.
    """
    part = partition(model, list(cuts), example)
    head = copy.deepcopy(part.segments[0].module).eval()
    with torch.no_grad():
        acts = head(x)
    extra = None
    if noise > 0:
        extra = noise * torch.randn(acts.shape, generator=torch.Generator().manual_seed(seed))
        acts = acts + extra
    label_auc = None
    if len(cuts) == 1 and y is not None and not y.dtype.is_floating_point:
        label_auc = label_leakage_auc(
            cut_gradients(part.segments[0].module, part.segments[1].module, x, y, extra), y)
    if not x.dtype.is_floating_point:
        tokens, baseline = recover_tokens(acts, x, epochs=epochs)
        return Leakage(psnr_db=None, ssim=None, label_auc=label_auc, token_accuracy=tokens, token_baseline=baseline)
    rec = invert(acts, x, epochs=epochs)
    ref = x[x.shape[0] // 2:]
    data_range = float(x.max() - x.min()) or 1.0
    image = x.dim() >= 4 and min(x.shape[-2:]) >= 3
    return Leakage(psnr_db=psnr(rec, ref, data_range), ssim=ssim(rec, ref, data_range) if image else None,
                   label_auc=label_auc)
