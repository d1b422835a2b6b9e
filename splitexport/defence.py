"""Privacy defences on the first device segment A (``partition --nopeek W --activation-noise S``).

- NoPeek (Vepakomma et al. 2020): A trains on its share of the label loss plus ``W * dCor(x, A(x))``, the
  sample distance correlation (Szekely et al. 2007) between the raw input batch and A's output.
- Activation noise: what leaves the device during training is ``A(x) + S * n``, ``n ~ N(0, 1)`` drawn on the
  device; the returned gradient is used as is (``d(out + S n)/d(out) = I``). Evaluation sends no noise.

The noise is drawn from ``numpy.random.default_rng(seed).standard_normal(shape, dtype=float32)``, one draw per
training forward, in every runtime (torch here, ``device_runtime.OrtSegment``), so runs with the same seed add the
same noise and can be compared weight by weight with the monolithic model trained with the same terms.
"""

from __future__ import annotations

import numpy as np
import torch

from ._manifest import DefenceSpec

EPS = 1e-12
"""Added under every square root of the distance correlation: identical rows (a batch hitting dead ReLUs, all-zero
outputs) keep finite gradients. It moves the value by less than 1e-6 on real batches."""


def distance_matrix(t: torch.Tensor) -> torch.Tensor:
    """``sqrt(|t_i - t_j|^2 + EPS)`` between the rows of ``t`` (flattened per sample).

    The exported ONNX graph computes the same, op for op (:mod:`splitexport.export._onnx_defence`).
    """
    f = t.flatten(1)
    diff = f.unsqueeze(1) - f.unsqueeze(0)
    return ((diff * diff).sum(2) + EPS).sqrt()


def _centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of the batches ``x`` and ``z`` (0: independent, 1: equal up to scale/rotation).

    ``dCor = sqrt(relu(dCov^2(x, z) / sqrt(dVar^2(x) dVar^2(z) + EPS)) + EPS)`` with double-centred distance
    matrices (V-statistics, Szekely et al. 2007). A batch of one sample gives ``sqrt(EPS)`` and no gradient.
    """
    a = _centred(distance_matrix(x.to(z.dtype)))
    b = _centred(distance_matrix(z))
    ratio = (a * b).mean() / ((a * a).mean() * (b * b).mean() + EPS).sqrt()
    return (torch.relu(ratio) + EPS).sqrt()


class NoiseSource:
    """Standard normal float32 noise, one draw per training forward (the same in every runtime for a seed)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._rng.standard_normal(shape, dtype=np.float32)


class Defence:
    """The defence of a bundle as applied in torch: the extra loss term and the noise on A's output."""

    def __init__(self, spec: DefenceSpec, seed: int = 0) -> None:
        self.spec = spec
        self.noise = NoiseSource(seed) if spec.activation_noise > 0 else None

    def penalty(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """``W * dCor(x, out)``, or ``None`` without NoPeek."""
        return self.spec.nopeek * distance_correlation(x.detach(), out) if self.spec.nopeek > 0 else None

    def perturb(self, out: torch.Tensor) -> torch.Tensor:
        """``out + S * n`` with the next noise draw (``out`` itself without noise)."""
        if self.noise is None:
            return out
        n = torch.from_numpy(self.noise.draw(tuple(out.shape)))
        return out + self.spec.activation_noise * n


def defence_for(spec: DefenceSpec | None, index: int, seed: int = 0) -> Defence | None:
    """The torch defence of segment ``index`` (only A, the first, has one), or ``None``."""
    return Defence(spec, seed) if spec is not None and spec.active and index == 0 else None
