"""Torch segment -> tf_keras (Keras 2) functional model built from standard layers.

The model takes and returns tensors in torch layout (NCHW images): a ``Permute``
at the entry and exit, NHWC inside. Layer names are the segment's fx node names,
so the weight ``stem_0/kernel`` belongs to torch's ``stem.0.weight``. TensorFlow is
imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from .._errors import ExportError
from ._layergraph import LayerGraph, layer_graph
from ._seqops import SEQ_KINDS

if TYPE_CHECKING:
    import tf_keras

__all__ = ["check_device_segment", "keras_model", "to_keras"]


def check_device_segment(graph: LayerGraph, is_last: bool) -> None:
    """Refuse layers a device segment cannot train exactly.

    Dropout in a segment that trains on a received gradient would draw one mask in
    ``forward`` (the activation sent downstream) and another in the training step.
    """
    if not is_last:
        for lyr in graph.layers:
            if lyr.kind == "dropout" and lyr.attrs["rate"] > 0:
                raise ExportError(
                    f"{lyr.source}: Dropout in a segment that trains on a received gradient is not supported "
                    "(its forward and training step would draw different masks); move it to the last segment "
                    "or the server"
                )


def to_keras(module: nn.Module, input_shape: tuple[int, ...]) -> tf_keras.Model:
    """Map a segment to a tf_keras model with its weights copied (see :func:`keras_model`)."""
    return keras_model(layer_graph(module, input_shape))


def keras_model(graph: LayerGraph) -> tf_keras.Model:
    """Build the tf_keras functional model of ``graph`` and set its weights."""
    import tf_keras
    from tf_keras import layers as L

    tensors: dict[str, Any] = {}
    weights: list[tuple[Any, list[Any]]] = []
    dtype = graph.layers[0].attrs.get("dtype", "float32")
    inp = tf_keras.Input(shape=graph.input_shape, name="input", dtype="float32" if dtype == "float32" else "int32")
    x = inp
    if len(graph.input_shape) == 3:
        x = L.Permute((2, 3, 1), name="input_to_nhwc")(x)
    for lyr in graph.layers:
        if lyr.kind == "input":
            tensors[lyr.name] = x
            continue
        ins = [tensors[i] for i in lyr.inputs]
        a = lyr.attrs
        layer: Any
        if lyr.kind in ("conv2d", "depthwise2d"):
            t, b, left, r = a["pads"]
            h = ins[0]
            if any(a["pads"]):
                h = L.ZeroPadding2D(((t, b), (left, r)), name=f"{lyr.name}_pad")(h)
            if lyr.kind == "conv2d":
                layer = L.Conv2D(
                    a["out_channels"],
                    a["kernel"],
                    strides=a["strides"],
                    padding="valid",
                    use_bias="bias" in lyr.weights,
                    name=lyr.name,
                )
                keys = ["kernel", "bias"]
            else:
                layer = L.DepthwiseConv2D(
                    a["kernel"],
                    strides=a["strides"],
                    padding="valid",
                    depth_multiplier=a["multiplier"],
                    use_bias="bias" in lyr.weights,
                    name=lyr.name,
                )
                keys = ["depthwise_kernel", "bias"]
            out = layer(h)
            weights.append((layer, [lyr.weights[k] for k in keys if k in lyr.weights]))
        elif lyr.kind == "batchnorm":
            layer = L.BatchNormalization(axis=-1, momentum=1.0 - a["momentum"], epsilon=a["epsilon"], name=lyr.name)
            out = layer(ins[0])
            weights.append((layer, [lyr.weights[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")]))
        elif lyr.kind == "relu":
            out = L.ReLU(name=lyr.name)(ins[0])
        elif lyr.kind in ("gelu", "sigmoid", "tanh"):
            out = L.Activation(lyr.kind, name=lyr.name)(ins[0])
        elif lyr.kind == "maxpool2d":
            out = L.MaxPooling2D(a["pool"], strides=a["strides"], padding="valid", name=lyr.name)(ins[0])
        elif lyr.kind == "gap":
            h = L.GlobalAveragePooling2D(name=lyr.name)(ins[0])
            out = L.Reshape(lyr.shape, name=f"{lyr.name}_keepdims")(h)
        elif lyr.kind == "flatten":
            h = L.Permute((3, 1, 2), name=f"{lyr.name}_to_nchw")(ins[0])
            out = L.Flatten(name=lyr.name)(h)
        elif lyr.kind == "linear":
            layer = L.Dense(lyr.shape[0], use_bias="bias" in lyr.weights, name=lyr.name)
            out = layer(ins[0])
            weights.append((layer, [lyr.weights[k] for k in ("kernel", "bias") if k in lyr.weights]))
        elif lyr.kind == "embedding":
            layer = L.Embedding(a["num"], a["dim"], name=lyr.name)
            out = layer(ins[0])
            weights.append((layer, [lyr.weights["embeddings"]]))
        elif lyr.kind in SEQ_KINDS:
            from ._seqtf import keras_layer

            layer = keras_layer(lyr.kind, lyr.name, lyr.weights, a)
            out = layer(ins[0])
            weights.append((layer, list(lyr.weights.values())))
        elif lyr.kind == "dropout":
            out = L.Dropout(a["rate"], name=lyr.name)(ins[0])
        elif lyr.kind == "add":
            out = L.Add(name=lyr.name)(ins)
        elif lyr.kind == "concat":
            out = L.Concatenate(axis=a["axis"], name=lyr.name)(ins)
        else:  # pragma: no cover - layer_graph produces only the kinds above
            raise ExportError(f"{lyr.source}: no Keras mapping for {lyr.kind}")
        tensors[lyr.name] = out
    y = tensors[graph.output]
    if len(graph.output_shape) == 3:
        y = L.Permute((3, 1, 2), name="output_to_nchw")(y)
    model = tf_keras.Model(inp, y, name="segment")
    for layer, values in weights:
        layer.set_weights(values)
    return model
