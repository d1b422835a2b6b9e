"""Torch segment -> tf_keras (Keras 2) functional model built from standard layers.

The model takes and returns tensors in torch layout (NCHW images): a ``Permute``
at the entry and exit, NHWC inside. Layer names are the segment's fx node names,
so the weight ``stem_0/kernel`` belongs to torch's ``stem.0.weight``. TensorFlow is
imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ._layergraph import LayerGraph, layer_graph
from .ops import REGISTRY, KerasContext

if TYPE_CHECKING:
    import tf_keras

__all__ = ["check_device_segment", "keras_model", "to_keras"]


def check_device_segment(graph: LayerGraph, is_last: bool) -> None:
    """Refuse layers a device segment cannot train (none today: dropout masks are seeded, see ops/dropout.py)."""


def to_keras(module: nn.Module, input_shape: tuple[int, ...]) -> tf_keras.Model:
    """Map a segment to a tf_keras model with its weights copied (see :func:`keras_model`)."""
    return keras_model(layer_graph(module, input_shape))


def keras_model(graph: LayerGraph) -> tf_keras.Model:
    """Build the tf_keras functional model of ``graph`` (each layer by its kind in the op table) and set its weights."""
    import tf_keras
    from tf_keras import layers as L

    ctx = KerasContext(L)
    tensors: dict[str, Any] = {}
    dtype = graph.layers[0].attrs.get("dtype", "float32")
    inp = tf_keras.Input(shape=graph.input_shape, name="input", dtype="float32" if dtype == "float32" else "int32")
    x = inp
    if len(graph.input_shape) == 3:
        x = L.Permute((2, 3, 1), name="input_to_nhwc")(x)
    for lyr in graph.layers:
        if lyr.kind == "input":
            tensors[lyr.name] = x
            continue
        tensors[lyr.name] = REGISTRY.kind(lyr.kind).keras(ctx, lyr, [tensors[i] for i in lyr.inputs])
    y = tensors[graph.output]
    if len(graph.output_shape) == 3:
        y = L.Permute((3, 1, 2), name="output_to_nchw")(y)
    model = tf_keras.Model(inp, y, name="segment")
    for layer, values in ctx.weights:
        layer.set_weights(values)
    return model
