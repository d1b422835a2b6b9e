""":class:`OrtSegment` as a ``splitexport`` segment runner (torch tensors in and out) for simulations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._arrays import as_float32
from ._ort import OrtRuntimeError, OrtSegment
from ._runner import DeviceRunner

if TYPE_CHECKING:
    from splitexport import Bundle, OptimizerSpec

__all__ = ["OrtRunner"]


class OrtRunner(DeviceRunner[OrtSegment]):
    """Runs one device segment in ONNX Runtime behind the split trainer's runner interface."""

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | str | Path,
        name: str,
        *,
        optimizer: OptimizerSpec | None = None,
        ort_format: bool = False,
        threads: int | None = None,
        seed: int | None = None,
    ) -> OrtRunner:
        """Load segment ``name``; ``optimizer`` must be what the artifacts were exported for (any lr).

        ``threads``: ORT intra-op threads; ``seed``: dropout masks and activation noise (see :class:`OrtSegment`).
        """
        from splitexport import Bundle, SplitExportError, load_bundle
        from splitexport.export import DeviceOptimizer

        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        lr = None
        options = b.manifest.exports.get("onnx")
        if optimizer is not None and options is not None:
            exported = DeviceOptimizer.from_json(options["optimizer"])  # type: ignore[arg-type]
            if not exported.matches(optimizer):
                raise SplitExportError(
                    f"the ONNX artifacts of {b.path} train with {exported.name} "
                    f"(betas={exported.betas}, eps={exported.eps}, weight_decay={exported.weight_decay}), but the "
                    f"run asks for {optimizer.name} (momentum={optimizer.momentum}, weight_decay={optimizer.weight_decay}, "
                    f"betas={optimizer.betas}, eps={optimizer.eps}); re-export with `splitexport export {b.path} "
                    "--format onnx --optimizer ...` or run with matching optimizer options"
                )
            lr = optimizer.lr
        try:
            seg = OrtSegment.from_bundle(b, name, ort_format=ort_format, learning_rate=lr, threads=threads,
                                       seed=seed)
        except OrtRuntimeError as exc:
            raise SplitExportError(str(exc)) from exc
        return cls(seg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._pending = _as_input(x)
        return torch.from_numpy(self.segment.forward(self._pending))

    def train_with_labels(
        self, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor | None, torch.Tensor]:
        loss, grad_in = self.segment.train_with_labels(as_float32(x), labels.detach().cpu().numpy())
        out = self.segment.last_output
        assert out is not None
        return loss, torch.from_numpy(grad_in), torch.from_numpy(out)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.segment.evaluate(_as_input(x)))


def _as_input(x: torch.Tensor) -> np.ndarray:
    """Integer token ids stay integers (a first segment that embeds them); anything else becomes float32."""
    t = x.detach().cpu()
    return np.ascontiguousarray(t.numpy()) if not t.is_floating_point() else as_float32(t)
