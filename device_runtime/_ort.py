"""One device segment trained with the ONNX Runtime training API: the reference phone runtime.

It uses only what the mobile training APIs (Android, iOS, C/C++) also offer: a
checkpoint state, training sessions (``Module``) and an optimizer. One
checkpoint state is shared by two sessions: the main one (training model +
inference-mode eval model + optimizer) and, for segments that send an
activation, a second one whose eval slot holds the training-mode forward model.
Parameters live in the state, so an optimizer step is seen by both at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._arrays import batch_labels

if TYPE_CHECKING:
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    from splitexport import Bundle

__all__ = ["OrtArtifacts", "OrtRuntimeError", "OrtSegment"]

INPUT = "input"
OUTPUT = "output"
GRAD_OUTPUT = "grad_output"
LABELS = "labels"
MASKS_METADATA = "splitexport.dropout_masks"
"""Forward-model metadata: JSON list of ``{"name", "p", "shape", "layer"}``, one per dropout mask input."""
DEFENCE_METADATA = "splitexport.defence"
"""Forward-model metadata of a defended first segment: ``{"nopeek", "activation_noise", "noise_input", "noise_shape"}``."""
_MODELS = ("training_model", "forward_model", "eval_model", "optimizer_model")


class OrtRuntimeError(RuntimeError):
    """Misuse of a device segment (wrong step for its role, bad shapes, missing artifacts)."""


@dataclass(frozen=True)
class OrtArtifacts:
    """Paths of one segment's artifacts (``.onnx`` or ``.ort`` models)."""

    training_model: Path
    forward_model: Path
    eval_model: Path
    optimizer_model: Path
    checkpoint: Path

    @classmethod
    def in_directory(cls, directory: str | Path, *, ort_format: bool = False) -> OrtArtifacts:
        """The artifacts written by ``export_segment_onnx`` into ``directory``."""
        d = Path(directory)
        ext = ".ort" if ort_format else ".onnx"
        return cls.from_mapping({**{m: d / f"{m}{ext}" for m in _MODELS}, "checkpoint": d / "checkpoint"})

    @classmethod
    def from_mapping(cls, paths: Mapping[str, str | Path], *, ort_format: bool = False) -> OrtArtifacts:
        suffix = "_ort" if ort_format else ""
        try:
            models = {m: Path(paths[f"{m}{suffix}"]) for m in _MODELS}
            return cls(
                training_model=models["training_model"],
                forward_model=models["forward_model"],
                eval_model=models["eval_model"],
                optimizer_model=models["optimizer_model"],
                checkpoint=Path(paths["checkpoint"]),
            )
        except KeyError as exc:
            hint = " (export with --ort-format)" if ort_format else ""
            raise OrtRuntimeError(f"artifact {exc.args[0]!r} is missing{hint}") from None


class OrtSegment:
    """Forward, train (on a received gradient or on labels), evaluate, checkpoint one segment.

    Arrays are numpy: float32 inputs with the batch first (integer token ids for a
    first segment exported with an int64/int32 input); labels int64 class
    indices (cross-entropy) or float32 targets shaped like the output (MSE).

    Dropout in a segment that trains on a received gradient: the artifacts take one
    mask per Dropout layer as an input (``dropout_mask_<k>``). :meth:`forward` draws
    fresh masks (keep with probability ``1 - p``, scaled by ``1 / (1 - p)``) from a
    generator seeded with ``seed`` and :meth:`train_with_gradient` reuses them, so the
    step recomputes exactly the activation that was sent. The masks are not torch's.

    A first segment exported with activation noise (``partition --activation-noise S``) takes standard normal
    noise as a forward-model input: :meth:`forward` draws it from ``numpy.random.default_rng(seed)`` (a generator
    of its own, float32, one draw per forward, as ``splitexport``'s torch runs do) and sends ``out + S * noise``.
    NoPeek's term is inside the training model and needs nothing from the runtime.
    """

    def __init__(
        self,
        artifacts: OrtArtifacts,
        *,
        learning_rate: float | None = None,
        checkpoint: str | Path | None = None,
        name: str = "segment",
        threads: int | None = None,
        seed: int | None = None,
    ) -> None:
        """``threads``: ORT intra-op threads, not spinning while idle (default: ORT's pool, one per core).

        ``seed``: of the generators that draw dropout masks (segments with Dropout before the server) and
        activation noise (a first segment exported with ``--activation-noise``).
        """
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        for path in (*(getattr(artifacts, m) for m in _MODELS), artifacts.checkpoint):
            if not Path(path).is_file():
                raise OrtRuntimeError(f"segment {name}: artifact {path} does not exist")
        self.name = name
        self.artifacts = artifacts
        self.threads = threads
        self._state: CheckpointState = CheckpointState.load_checkpoint(os.fspath(checkpoint or artifacts.checkpoint))
        self._module: Module = Module(os.fspath(artifacts.training_model), self._state, os.fspath(artifacts.eval_model),
                                      session_options=self._session_options())
        self._optimizer: Optimizer = Optimizer(os.fspath(artifacts.optimizer_model), self._module)
        self._forward: Module | None = None
        inputs = list(self._module.input_names())
        if LABELS in inputs:
            self.trains_with: Literal["labels", "gradient"] = "labels"
        elif GRAD_OUTPUT in inputs:
            self.trains_with = "gradient"
        else:
            raise OrtRuntimeError(f"segment {name}: {artifacts.training_model} takes {inputs}, not a splitexport model")
        self.last_output: np.ndarray | None = None
        """The output (logits) of the last :meth:`train_with_labels` step."""
        if learning_rate is not None:
            self.set_learning_rate(learning_rate)
        shape, self.input_dtype, masks, defence = self._input_info(artifacts.eval_model, artifacts.forward_model)
        self.dropout_masks: list[tuple[str, float, tuple[int, ...]]] = masks
        self.defence: dict[str, Any] = defence
        """The defence recorded in the artifacts (``nopeek``, ``activation_noise``; empty: none)."""
        self._noise_rng = np.random.default_rng(seed)
        """(input name, p, shape without the batch) of each dropout mask the artifacts take."""
        self._rng = np.random.default_rng(seed)
        self._masks: list[np.ndarray] | None = None
        self.batch_size: int | None = shape[0]
        """The fixed batch size of the artifacts, or ``None`` when the batch is dynamic."""
        self._input_shape = shape[1:]

    # construction -------------------------------------------------------------------------------

    @classmethod
    def from_directory(cls, directory: str | Path, *, ort_format: bool = False, **kwargs: Any) -> OrtSegment:
        """Load the artifacts ``export_segment_onnx`` wrote into ``directory``."""
        return cls(OrtArtifacts.in_directory(directory, ort_format=ort_format), **kwargs)

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | str | Path,
        name: str,
        *,
        checkpoint: str | Path | None = None,
        ort_format: bool = False,
        learning_rate: float | None = None,
        threads: int | None = None,
        seed: int | None = None,
    ) -> OrtSegment:
        """Segment ``name`` of a bundle exported with ``splitexport export --format onnx``.

        The learning rate defaults to the one the bundle was exported with.
        """
        from splitexport import Bundle, load_bundle

        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        spec = b.segment(name)
        if spec.role != "device":
            raise OrtRuntimeError(f"segment {name} runs on the server, not on the device")
        rel = spec.artifacts.get("onnx")
        if not rel:
            raise OrtRuntimeError(
                f"bundle {b.path} has no ONNX artifacts for segment {name}; run `splitexport export {b.path} --format onnx`"
            )
        lr = learning_rate
        if lr is None:
            optimizer = b.manifest.exports.get("onnx", {}).get("optimizer")
            lr = float(optimizer["lr"]) if isinstance(optimizer, dict) and "lr" in optimizer else None
        artifacts = OrtArtifacts.from_mapping({k: b.file(v) for k, v in rel.items()}, ort_format=ort_format)
        return cls(artifacts, learning_rate=lr, checkpoint=checkpoint, name=name, threads=threads, seed=seed)

    # the steps ----------------------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The activation to send: training-mode forward that leaves the running statistics alone."""
        x = self._check_input(x)
        if self._forward is None:
            from onnxruntime.training.api import Module

            self._forward = Module(
                os.fspath(self.artifacts.training_model), self._state, os.fspath(self.artifacts.forward_model),
                session_options=self._session_options(),
            )
            self._forward.eval()
        self._masks = self.draw_masks(x.shape[0])
        noise = self.draw_noise(x.shape[0])
        return np.asarray(self._forward(x, *self._masks, *noise))

    def draw_noise(self, batch: int) -> list[np.ndarray]:
        """The next standard normal noise for a batch (empty when the artifacts add none)."""
        if not self.defence.get("noise_input"):
            return []
        shape = (batch, *(int(d) for d in self.defence["noise_shape"]))
        return [self._noise_rng.standard_normal(shape, dtype=np.float32)]

    def draw_masks(self, batch: int) -> list[np.ndarray]:
        """Fresh dropout masks for a batch (empty when the segment has no Dropout before the server)."""
        return [
            ((self._rng.random((batch, *shape)) >= p) / (1.0 - p)).astype(np.float32)
            for _, p, shape in self.dropout_masks
        ]

    def train_with_gradient(self, x: np.ndarray, grad_out: np.ndarray) -> None:
        """One optimizer step on the received ``dL/d(output)`` for input ``x`` (segments before the server)."""
        if self.trains_with != "gradient":
            raise OrtRuntimeError(f"segment {self.name} is the last segment; train it with train_with_labels")
        x = self._check_input(x)
        g = np.ascontiguousarray(grad_out, dtype=np.float32)
        if g.shape[0] != x.shape[0]:
            raise OrtRuntimeError(f"gradient batch {g.shape[0]} != input batch {x.shape[0]}")
        masks, self._masks = self._masks, None
        if self.dropout_masks and (masks is None or masks[0].shape[0] != x.shape[0]):
            raise OrtRuntimeError(
                f"segment {self.name} has Dropout: call forward(x) before train_with_gradient(x, g) so the step "
                "uses the masks of the activation that was sent"
            )
        self._step(x, *(masks or []), g)

    def train_with_labels(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One optimizer step on the label loss; returns (loss, ``dL/d(input)`` to send back).

        The output of this step (the logits) is kept in :attr:`last_output`.
        """
        if self.trains_with != "labels":
            raise OrtRuntimeError(f"segment {self.name} trains on a received gradient; use train_with_gradient")
        x = self._check_input(x)
        y = batch_labels(labels, x, OrtRuntimeError)
        outputs = self._step(x, self._labels(y))
        loss, grad_in, out = outputs
        self.last_output = np.asarray(out)
        return float(np.asarray(loss).reshape(())), grad_in

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs (running statistics, no dropout); changes nothing."""
        x = self._check_input(x)
        self._module.eval()
        return np.asarray(self._module(x))

    def _step(self, x: np.ndarray, *rest: np.ndarray) -> tuple[np.ndarray, ...]:
        self._module.train()
        self._module.lazy_reset_grad()
        out = self._module(x, *rest)
        self._optimizer.step()
        return out if isinstance(out, tuple) else (out,)

    # state ------------------------------------------------------------------------------------------

    def set_learning_rate(self, lr: float) -> None:
        if not lr > 0:
            raise OrtRuntimeError(f"learning rate must be positive, got {lr}")
        self._optimizer.set_learning_rate(float(lr))

    @property
    def learning_rate(self) -> float:
        return float(self._optimizer.get_learning_rate())

    def save_checkpoint(self, path: str | Path, *, include_optimizer_state: bool = True) -> Path:
        """Write parameters, BatchNorm statistics and (by default) the optimizer state to ``path``."""
        from onnxruntime.training.api import CheckpointState

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        CheckpointState.save_checkpoint(self._state, os.fspath(p), include_optimizer_state)
        return p

    def export_inference_model(self, path: str | Path) -> Path:
        """An inference-only ONNX model with the current weights (runs with plain onnxruntime)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._module.export_model_for_inferencing(os.fspath(p), [OUTPUT])
        return p

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters and BatchNorm statistics by their torch names."""
        return {name: np.array(param.data) for name, param in self._state.parameters}

    # checks ---------------------------------------------------------------------------------------

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        given = np.asarray(x)
        if np.issubdtype(self.input_dtype, np.integer) and not np.issubdtype(given.dtype, np.integer):
            raise OrtRuntimeError(
                f"segment {self.name} takes integer token ids ({self.input_dtype.name}), got {given.dtype} values"
            )
        arr = np.ascontiguousarray(given, dtype=self.input_dtype)
        if self.batch_size is not None and arr.ndim > 0 and arr.shape[0] != self.batch_size:
            raise OrtRuntimeError(
                f"segment {self.name} was exported for batches of exactly {self.batch_size}, got {arr.shape[0]}"
            )
        if arr.ndim != len(self._input_shape) + 1 or any(
            d is not None and d != s for d, s in zip(self._input_shape, arr.shape[1:])
        ):
            raise OrtRuntimeError(
                f"segment {self.name} takes inputs of shape (batch, {', '.join(str(d) for d in self._input_shape)}), "
                f"got {arr.shape}"
            )
        return arr

    @staticmethod
    def _labels(y: np.ndarray) -> np.ndarray:
        """Integer labels are class indices (int64); float labels are regression targets (float32)."""
        if np.issubdtype(y.dtype, np.integer):
            return np.ascontiguousarray(y, dtype=np.int64)
        return np.ascontiguousarray(y, dtype=np.float32)

    def _session_options(self) -> Any:
        if self.threads is None:
            return None
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = self.threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    @staticmethod
    def _input_info(
        eval_model: Path, forward_model: Path
    ) -> tuple[tuple[int | None, ...], np.dtype[Any], list[tuple[str, float, tuple[int, ...]]], dict[str, Any]]:
        """Input dims (``None`` for a symbolic dim) and dtype from the eval model; masks and defence from the
        forward model."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(os.fspath(eval_model), opts, providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
        for arg in session.get_inputs():
            if arg.name == INPUT:
                if arg.type not in types:
                    raise OrtRuntimeError(f"{eval_model}: input type {arg.type} is not supported")
                dims = tuple(d if isinstance(d, int) else None for d in arg.shape)
                break
        else:
            raise OrtRuntimeError(f"{eval_model} has no input {INPUT!r}")
        masks: list[tuple[str, float, tuple[int, ...]]] = []
        if Path(forward_model).suffix == ".onnx":
            import onnx

            meta = {p.key: p.value for p in onnx.load(os.fspath(forward_model), load_external_data=False).metadata_props}
        else:
            fwd = ort.InferenceSession(os.fspath(forward_model), opts, providers=["CPUExecutionProvider"])
            meta = dict(fwd.get_modelmeta().custom_metadata_map)
        for m in json.loads(meta.get(MASKS_METADATA, "[]")):
            masks.append((str(m["name"]), float(m["p"]), tuple(int(d) for d in m["shape"][1:])))
        defence = json.loads(meta.get(DEFENCE_METADATA, "{}"))
        return dims, np.dtype(types[arg.type]), masks, defence
