"""TFLite device runtime: trains an exported segment through the model's signature runners.

Mirrors :class:`device_runtime.OrtSegment`: ``forward``, ``train_with_gradient``,
``train_with_labels``, ``evaluate`` and checkpoints. The ``builtin`` variant runs on
the stock LiteRT interpreter (``ai-edge-litert``, what apps ship); the ``flex``
variant needs the Flex delegate, i.e. TensorFlow's own ``tf.lite.Interpreter``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._arrays import batch_labels

__all__ = ["TfliteRuntimeError", "TfliteSegment"]

Variant = Literal["flex", "builtin"]


class TfliteRuntimeError(RuntimeError):
    """A TFLite segment was used in a way it does not support (wrong shapes, role, files)."""


def _interpreter(model: bytes, variant: str, backend: str) -> Any:
    if backend == "auto":
        backend = "litert" if variant == "builtin" else "tensorflow"
    if backend == "litert":
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_content=model)
    if backend == "tensorflow":
        import tensorflow as tf

        # Without the default XNNPack delegate: it fails to prepare some training graphs of the flex variant
        # ("failed to create XNNPACK Value", "XNNPack delegate failed to reshape"); the Flex delegate stays.
        resolver = tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        return tf.lite.Interpreter(model_content=model, experimental_op_resolver_type=resolver)
    raise TfliteRuntimeError(f"unknown interpreter backend {backend!r}; expected auto, litert or tensorflow")


def _as_input(x: Any, dtype: str, name: str) -> np.ndarray:
    """``x`` as the segment's input dtype: float32, or int32 token ids (from any integer array, range-checked)."""
    arr = np.asarray(x)
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TfliteRuntimeError(f"segment {name} takes integer ids ({dtype}), got {arr.dtype} values")
    if arr.size and (int(arr.min()) < np.iinfo(np.int32).min or int(arr.max()) > np.iinfo(np.int32).max):
        raise TfliteRuntimeError(f"segment {name}: ids outside the int32 range")
    return np.ascontiguousarray(arr, dtype=np.int32)


class TfliteSegment:
    """One device segment exported by ``splitexport export --format tflite``.

    Arrays are numpy, batch first, torch layout (NCHW). A segment exported for token ids
    (``input_dtype`` int32) takes integer arrays (int64 included). Labels are int class indices
    (cross-entropy) or float targets shaped like the output (MSE). The builtin variant
    has a fixed batch size (``batch_size``); the flex variant takes any batch.
    """

    def __init__(
        self,
        model_path: str | Path,
        meta: Mapping[str, Any],
        *,
        backend: str = "auto",
        name: str = "segment",
    ) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise TfliteRuntimeError(f"segment {name}: {path} does not exist")
        if not str(meta.get("format", "")).startswith("splitexport-tflite/"):
            raise TfliteRuntimeError(f"segment {name}: metadata is not splitexport TFLite metadata")
        self.name = name
        self.meta = dict(meta)
        self.variant: Variant = meta["variant"]
        self.trains_with: Literal["labels", "gradient"] = meta["trains_with"]
        self.batch_size: int | None = meta.get("batch_size")
        self.input_shape = tuple(int(d) for d in meta["input_shape"])
        self.input_dtype: str = meta.get("input_dtype", "float32")
        """``float32``, or ``int32`` for token ids (int64 ids are accepted and range-checked)."""
        self.output_shape = tuple(int(d) for d in meta["output_shape"])
        self._interp = _interpreter(path.read_bytes(), self.variant, backend)
        self._runners = {
            k: self._interp.get_signature_runner(k) for k in ("infer", "forward", "train", "save", "restore")
        }
        self.last_loss: float | None = None

    # construction -------------------------------------------------------------------------------

    @classmethod
    def from_directory(cls, directory: str | Path, *, variant: Variant = "builtin", **kwargs: Any) -> TfliteSegment:
        """Load ``<variant>.tflite`` and its entry in ``tflite.json`` from ``directory``."""
        d = Path(directory)
        meta_path = d / "tflite.json"
        if not meta_path.is_file():
            raise TfliteRuntimeError(f"{d} has no tflite.json (export with `splitexport export --format tflite`)")
        metas = json.loads(meta_path.read_text())["variants"]
        if variant not in metas:
            raise TfliteRuntimeError(f"{d} has no {variant!r} variant; it has {sorted(metas)}")
        return cls(d / metas[variant]["file"], metas[variant], **kwargs)

    @classmethod
    def from_bundle(cls, bundle: Any, name: str, *, variant: Variant = "builtin", **kwargs: Any) -> TfliteSegment:
        """Segment ``name`` of a bundle exported with ``splitexport export --format tflite``."""
        from splitexport import Bundle, load_bundle

        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        spec = b.segment(name)
        arts = spec.artifacts.get("tflite")
        if spec.role != "device" or not arts:
            raise TfliteRuntimeError(
                f"bundle {b.path} has no TFLite artifacts for segment {name}; "
                f"run `splitexport export {b.path} --format tflite`"
            )
        if variant not in arts:
            raise TfliteRuntimeError(f"segment {name} was exported without the {variant!r} variant")
        metas = json.loads(b.file(arts["meta"]).read_text())["variants"]
        return cls(b.file(arts[variant]), metas[variant], name=name, **kwargs)

    # the steps ----------------------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The activation to send: training-mode forward that changes no state."""
        return np.asarray(self._runners["forward"](x=self._check_input(x))["output"])

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs (running statistics, no dropout)."""
        return np.asarray(self._runners["infer"](x=self._check_input(x))["output"])

    def train_with_gradient(self, x: np.ndarray, grad_out: np.ndarray) -> float:
        """One aux-loss optimizer step on the received ``dL/d(output)``; returns the aux loss."""
        if self.trains_with != "gradient":
            raise TfliteRuntimeError(f"segment {self.name} is the last segment; train it with train_with_labels")
        x = self._check_input(x)
        g = np.ascontiguousarray(grad_out, dtype=np.float32)
        if g.shape != (x.shape[0], *self.output_shape):
            raise TfliteRuntimeError(
                f"gradient of shape {g.shape} for output of shape {(x.shape[0], *self.output_shape)}"
            )
        self.last_loss = float(np.asarray(self._runners["train"](x=x, grad=g)["loss"]))
        return self.last_loss

    def train_with_labels(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """One label-loss optimizer step; returns (loss, ``dL/d(input)`` to send back)."""
        if self.trains_with != "labels":
            raise TfliteRuntimeError(f"segment {self.name} trains on a received gradient; use train_with_gradient")
        x = self._check_input(x)
        y = batch_labels(labels, x, TfliteRuntimeError)
        dtype = np.int32 if self.meta["labels_dtype"] == "int32" else np.float32
        out = self._runners["train"](x=x, labels=np.ascontiguousarray(y, dtype=dtype))
        self.last_loss = float(np.asarray(out["loss"]))
        return self.last_loss, np.asarray(out["grad_input"])

    # state --------------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Every variable (weights, BatchNorm statistics, optimizer slots, step) by its export name."""
        flat = np.asarray(self._runners["save"]()["state"])
        return {
            e["name"]: flat[e["offset"] : e["offset"] + e["size"]].reshape(e["shape"]).copy()
            for e in self.meta["state"]
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Set every variable from :meth:`state`'s output (all names must be present)."""
        flat = np.zeros(int(self.meta["state_size"]), dtype=np.float32)
        for e in self.meta["state"]:
            if e["name"] not in state:
                raise TfliteRuntimeError(f"state is missing {e['name']!r}")
            value = np.asarray(state[e["name"]], dtype=np.float32)
            if list(value.shape) != list(e["shape"]):
                raise TfliteRuntimeError(f"state {e['name']!r} has shape {value.shape}, expected {tuple(e['shape'])}")
            flat[e["offset"] : e["offset"] + e["size"]] = value.reshape(-1)
        self._runners["restore"](state=flat)

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write :meth:`state` as a safetensors file."""
        from safetensors.numpy import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.state().items()}, str(p))
        return p

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`."""
        from safetensors.numpy import load_file

        self.load_state(load_file(str(path)))

    def parameters(self) -> dict[str, np.ndarray]:
        """Weights and BatchNorm statistics by their torch state-dict names, in torch layout."""
        from splitexport.export import tf_to_torch_layout

        state = self.state()
        return {
            t: np.ascontiguousarray(tf_to_torch_layout(state[k], tr)) for k, (t, tr) in self.meta["torch_names"].items()
        }

    # checks -------------------------------------------------------------------------------------

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        arr = _as_input(x, self.input_dtype, self.name)
        if arr.shape[1:] != self.input_shape:
            raise TfliteRuntimeError(
                f"segment {self.name} takes inputs of shape (batch, {', '.join(map(str, self.input_shape))}), got {arr.shape}"
            )
        if self.batch_size is not None and arr.shape[0] != self.batch_size:
            raise TfliteRuntimeError(
                f"segment {self.name} ({self.variant} variant) was exported for batches of {self.batch_size}, "
                f"got {arr.shape[0]}; re-export with --batch-size or use the flex variant"
            )
        return arr
