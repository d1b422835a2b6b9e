""":class:`OrtSegment` as a ``splitexport`` segment runner (torch tensors in and out) for simulations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._ort import OrtRuntimeError, OrtSegment

if TYPE_CHECKING:
    from splitexport import Bundle, OptimizerSpec

__all__ = ["OrtRunner"]


class OrtRunner:
    """Runs one device segment in ONNX Runtime behind the split trainer's runner interface."""

    def __init__(self, segment: OrtSegment) -> None:
        self.segment = segment
        self._pending: np.ndarray | None = None

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str | Path, name: str, *, optimizer: OptimizerSpec | None = None, ort_format: bool = False
    ) -> OrtRunner:
        """Load segment ``name``; ``optimizer`` must be what the artifacts were exported for (any lr)."""
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
            seg = OrtSegment.from_bundle(b, name, ort_format=ort_format, learning_rate=lr)
        except OrtRuntimeError as exc:
            raise SplitExportError(str(exc)) from exc
        return cls(seg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = _numpy(x)
        self._pending = arr
        return torch.from_numpy(self.segment.forward(arr))

    def train_with_gradient(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        """The step for the last :meth:`forward`'s input; device segments before the server return nothing."""
        if self._pending is None:
            raise RuntimeError("train_with_gradient called without a preceding forward")
        x, self._pending = self._pending, None
        self.segment.train_with_gradient(x, _numpy(grad_out))
        return None

    def train_with_labels(
        self, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor | None, torch.Tensor]:
        loss, grad_in = self.segment.train_with_labels(_numpy(x), labels.detach().cpu().numpy())
        out = self.segment.last_output
        assert out is not None
        return loss, torch.from_numpy(grad_in), torch.from_numpy(out)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.segment.evaluate(_numpy(x)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and BatchNorm statistics by their torch names (to compare with torch runs)."""
        return {k: torch.from_numpy(v) for k, v in self.segment.parameters().items()}


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
