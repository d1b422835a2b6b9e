""":class:`TfliteSegment` behind the split trainer's runner interface (torch tensors in and out)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._arrays import as_float32
from ._runner import DeviceRunner
from ._tflite import TfliteRuntimeError, TfliteSegment, Variant

if TYPE_CHECKING:
    from splitexport import Bundle, OptimizerSpec

__all__ = ["TfliteRunner"]

_OPTIMIZER_FIELDS = ("name", "lr", "momentum", "weight_decay", "betas", "eps")


class TfliteRunner(DeviceRunner[TfliteSegment]):
    """Runs one device segment in a TFLite interpreter as a ``splitexport`` segment runner.

    The builtin variant has a fixed batch size: :meth:`evaluate` splits and pads any batch
    (inference is per sample), while training batches must have exactly that size.
    """

    @classmethod
    def from_bundle(cls, bundle: Bundle | str | Path, name: str, *, optimizer: OptimizerSpec | None = None,
                    variant: Variant | None = None, **kwargs: Any) -> TfliteRunner:
        """Load segment ``name``; ``variant`` defaults to flex (any batch) when exported, else builtin.

        The optimizer (learning rate included) is compiled into the TFLite graph, so ``optimizer``
        must equal the exported one.
        """
        from splitexport import Bundle, SplitExportError, load_bundle

        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        options = b.manifest.exports.get("tflite") or {}
        exported = options.get("optimizer")
        if optimizer is not None and isinstance(exported, dict):
            wanted = optimizer.model_dump()
            diff = {k: (exported.get(k), wanted[k]) for k in _OPTIMIZER_FIELDS
                    if _norm(exported.get(k)) != _norm(wanted[k])}
            if diff:
                raise SplitExportError(
                    f"the TFLite artifacts of {b.path} were exported for another optimizer "
                    f"({', '.join(f'{k}: exported {e!r}, run {w!r}' for k, (e, w) in diff.items())}); "
                    f"re-export with `splitexport export {b.path} --format tflite` or run with matching options"
                )
        if variant is None:
            variants = options.get("variants") or ["builtin"]
            variant = "flex" if "flex" in variants else "builtin"  # type: ignore[operator]
        try:
            return cls(TfliteSegment.from_bundle(b, name, variant=variant, **kwargs))
        except TfliteRuntimeError as exc:
            raise SplitExportError(str(exc)) from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Like :meth:`DeviceRunner.forward`, keeping integer token ids integer."""
        self._pending = _numpy(x)
        return torch.from_numpy(self.segment.forward(self._pending))

    def train_with_labels(
        self, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor | None, torch.Tensor]:
        arr = as_float32(x)
        # the train signature returns no logits; the training-mode forward gives the same output
        out = self.segment.forward(arr)
        loss, grad_in = self.segment.train_with_labels(arr, labels.detach().cpu().numpy())
        return loss, torch.from_numpy(np.array(grad_in)), torch.from_numpy(out)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        arr = _numpy(x)
        size = self.segment.batch_size
        if size is None or len(arr) == size:
            return torch.from_numpy(self.segment.evaluate(arr))
        chunks = []
        for start in range(0, len(arr), size):
            part = arr[start : start + size]
            padded = np.concatenate([part, np.zeros((size - len(part), *arr.shape[1:]), arr.dtype)])
            chunks.append(self.segment.evaluate(padded)[: len(part)])
        return torch.from_numpy(np.concatenate(chunks))


def _numpy(x: torch.Tensor) -> np.ndarray:
    """Float inputs as float32, integer ids unchanged (the segment checks and casts them)."""
    t = x.detach().cpu()
    return t.numpy() if not t.is_floating_point() else as_float32(t)


def _norm(value: object) -> object:
    """Compare JSON (lists) and pydantic (tuples) values alike."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
