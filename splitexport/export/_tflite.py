"""TFLite training export: ``infer``, ``forward``, ``train``, ``save`` and ``restore`` signatures.

Two variants of every device segment:

* ``flex``: gradients by ``tf.GradientTape`` (Select TF ops such as
  Conv2DBackpropFilter), dynamic batch. Runs on an interpreter with the Flex
  delegate (TensorFlow's ``tf.lite.Interpreter``; apps must link ``tensorflow-lite-select-tf-ops``).
* ``builtin``: a hand-written backward pass (:mod:`._tfops`) using builtin ops only,
  fixed batch size. Trains on the stock LiteRT interpreter (``ai-edge-litert``).

Signatures (inputs -> outputs; images NCHW, like torch):

* ``infer(x) -> output``: inference mode (BatchNorm running stats, no dropout).
* ``forward(x) -> output``: training-mode forward without side effects (the activation
  a gradient-trained segment sends downstream).
* ``train(x, grad) -> loss`` (segment trains on a received gradient: the aux-loss step), or
  ``train(x, labels) -> loss, grad_input`` (last segment: label loss, returns dL/d(input)).
* ``save() -> state`` and ``restore(state) -> state``: every variable (weights, BatchNorm
  statistics, optimizer slots, step) packed into one float vector; the layout is in the
  sidecar JSON written next to the model.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._errors import ExportError
from .._manifest import OptimizerSpec
from ._keras import check_device_segment
from ._layergraph import LayerGraph, segment_exporter

Variant = Literal["flex", "builtin"]
VARIANTS: tuple[Variant, ...] = ("flex", "builtin")
META_FORMAT = "splitexport-tflite/1"

__all__ = ["VARIANTS", "export_tflite_segment", "tflite_model_bytes", "write_tflite"]

OptimizerLike = OptimizerSpec | Mapping[str, Any] | None


def _build_module(
    graph: LayerGraph,
    *,
    is_last: bool,
    loss: str,
    optimizer: OptimizerLike,
    variant: Variant,
    batch_size: int | None,
) -> tuple[Any, dict[str, Any]]:
    """The tf.Module with the five signatures, and the signature functions."""
    import tensorflow as tf

    from ._options import optimizer_spec
    from ._tfops import TfSegment

    seg = TfSegment(graph, optimizer_spec(optimizer))
    if variant == "builtin":
        seg.check_builtin()
        if not batch_size or batch_size < 1:
            raise ExportError("the builtin-ops TFLite variant needs a fixed batch size (batch_size >= 1)")
    batch = batch_size if variant == "builtin" else None
    input_dtype = graph.layers[0].attrs.get("dtype", "float32")
    x_spec = tf.TensorSpec([batch, *graph.input_shape], tf.float32 if input_dtype == "float32" else tf.int32, name="x")
    if is_last and input_dtype != "float32":
        raise ExportError("the last segment cannot take integer ids (it must return dL/d(input)); cut after the Embedding")
    out_spec = tf.TensorSpec([batch, *graph.output_shape], tf.float32, name="grad")
    if loss == "cross_entropy":
        label_spec = tf.TensorSpec([batch], tf.int32, name="labels")
    else:
        label_spec = tf.TensorSpec([batch, *graph.output_shape], tf.float32, name="labels")
    state_vars = seg.state_variables()
    sizes = [int(np.prod(v.shape)) for v in state_vars]
    total = int(sum(sizes))

    @tf.function(input_signature=[x_spec])
    def infer(x: Any) -> dict[str, Any]:
        return {"output": seg.forward(x, "eval")[0]}

    @tf.function(input_signature=[x_spec])
    def forward(x: Any) -> dict[str, Any]:
        return {"output": seg.forward(x, "train")[0]}

    def step(x: Any, target: Any) -> dict[str, Any]:
        if variant == "flex":
            with tf.GradientTape() as tape:
                if input_dtype == "float32":
                    tape.watch(x)
                out, _ = seg.forward(x, "train", update_stats=True)
                if is_last:
                    loss_value, _ = seg.label_loss(out, target, loss)
                else:
                    loss_value, _ = seg.aux_loss(out, target)
            names = list(seg.trainable)
            grads = tape.gradient(loss_value, [x] + [seg.vars[n] for n in names])
            # Embedding gradients come as IndexedSlices: densify them for the optimizer's arithmetic
            gx, wgrads = grads[0], {n: tf.convert_to_tensor(gr) for n, gr in zip(names, grads[1:])}
        else:
            out, caches = seg.forward(x, "train", update_stats=True)
            if is_last:
                loss_value, gout = seg.label_loss(out, target, loss)
            else:
                loss_value, gout = seg.aux_loss(out, target)
            gx, wgrads = seg.backward(caches, gout)
        seg.apply_gradients(wgrads)
        result = {"loss": loss_value}
        if is_last:
            result["grad_input"] = gx
        return result

    if is_last:

        @tf.function(input_signature=[x_spec, label_spec])
        def train(x: Any, labels: Any) -> dict[str, Any]:
            return step(x, labels)

    else:

        @tf.function(input_signature=[x_spec, out_spec])
        def train(x: Any, grad: Any) -> dict[str, Any]:
            return step(x, grad)

    @tf.function(input_signature=[])
    def save() -> dict[str, Any]:
        return {"state": tf.concat([tf.reshape(v, [-1]) for v in state_vars], axis=0)}

    @tf.function(input_signature=[tf.TensorSpec([total], tf.float32, name="state")])
    def restore(state: Any) -> dict[str, Any]:
        offset = 0
        for v, size in zip(state_vars, sizes):
            v.assign(tf.reshape(tf.slice(state, [offset], [size]), v.shape))
            offset += size
        return {"state": state}

    sigs = {"infer": infer, "forward": forward, "train": train, "save": save, "restore": restore}
    names = seg.state_names()
    layout = []
    offset = 0
    for name, v, size in zip(names, state_vars, sizes):
        layout.append({"name": name, "shape": [int(d) for d in v.shape], "offset": offset, "size": size})
        offset += size
    meta = {
        "format": META_FORMAT,
        "variant": variant,
        "is_last": is_last,
        "trains_with": "labels" if is_last else "gradient",
        "loss": loss,
        "batch_size": batch,
        "input_shape": list(graph.input_shape),
        "input_dtype": "float32" if input_dtype == "float32" else "int32",
        "output_shape": list(graph.output_shape),
        "labels_dtype": "int32" if loss == "cross_entropy" else "float32",
        "optimizer": seg.opt.model_dump(mode="json"),
        "state": layout,
        "state_size": total,
        "torch_names": graph.torch_name_map(),
    }
    seg._signatures = sigs  # keep the functions alive with the module
    return seg, meta


def tflite_model_bytes(
    graph: LayerGraph,
    *,
    is_last: bool,
    loss: str = "cross_entropy",
    optimizer: OptimizerLike = None,
    variant: Variant = "flex",
    batch_size: int | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Convert ``graph`` to a TFLite training model; returns the flatbuffer and its metadata."""
    import tensorflow as tf

    if variant not in VARIANTS:
        raise ExportError(f"unknown TFLite variant {variant!r}; expected one of {VARIANTS}")
    if loss not in ("cross_entropy", "mse"):
        raise ExportError(f"unknown loss kind {loss!r}; expected cross_entropy or mse")
    check_device_segment(graph, is_last)
    module, meta = _build_module(
        graph, is_last=is_last, loss=loss, optimizer=optimizer, variant=variant, batch_size=batch_size
    )
    sigs = module._signatures
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures={k: f.get_concrete_function() for k, f in sigs.items()})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(sigs))
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if variant == "flex":
            ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
        converter.target_spec.supported_ops = ops
        converter.experimental_enable_resource_variables = True
        try:
            data = converter.convert()
        except Exception as exc:  # the converter raises ConverterError and friends
            raise ExportError(f"TFLite conversion ({variant} variant) failed: {str(exc)[-2000:]}") from exc
    return bytes(data), meta


def write_tflite(graph: LayerGraph, out_dir: str | Path, *, is_last: bool, loss: str = "cross_entropy",
                 optimizer: OptimizerLike = None, variants: tuple[Variant, ...] = VARIANTS,
                 batch_size: int = 32) -> dict[str, Path]:
    """Write the TFLite artifacts of ``graph``; returns artifact kind -> file (``flex``, ``builtin``, ``meta``).

    ``meta`` (``tflite.json``) holds the state layout and settings of each variant.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    metas: dict[str, Any] = {}
    for variant in variants:
        data, meta = tflite_model_bytes(
            graph,
            is_last=is_last,
            loss=loss,
            optimizer=optimizer,
            variant=variant,
            batch_size=batch_size if variant == "builtin" else None,
        )
        path = out / f"{variant}.tflite"
        path.write_bytes(data)
        files[variant] = path
        meta["file"] = path.name
        metas[variant] = meta
    meta_path = out / "tflite.json"
    meta_path.write_text(json.dumps({"format": META_FORMAT, "variants": metas}, indent=2) + "\n")
    files["meta"] = meta_path
    return files


export_tflite_segment = segment_exporter(
    write_tflite, "Export one device segment (fx GraphModule or TorchScript) as TFLite training models."
)
