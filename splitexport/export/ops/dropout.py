"""Dropout with seeded masks: the forward that sends the activation and the training step draw the same mask.

A device segment runs ``forward`` (the activation it sends), then, when the gradient comes
back, a training step that recomputes the forward. Independent random masks would make that
step train a different network than the one whose output was sent. So every dropout layer
draws its mask from a hash of (element index, ``seed``), where ``seed`` is a non-trainable
state variable of the layer (saved and restored with the weights): ``forward`` and ``train``
use the current seed, and every training step advances it by one afterwards. Masks are
Bernoulli(1 - p) per element, scaled by 1 / (1 - p) as torch does, but not torch's random
stream: dropout runs are not bit-comparable with torch. The dropouts inside attention layers use
the same hash and seed, one mask stream per site (:mod:`.attention`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf
from ._tfshared import uniform

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache

def _build(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    lyr = b.add(node, "dropout", [x], x.shape, rate=float(m.p))
    lyr.weights["seed"] = np.zeros([1], np.float32)


def _keras(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    from .._keras_layers import SeededDropout

    layer = SeededDropout(lyr.attrs["rate"], name=lyr.name)
    out = layer(ins[0])
    ctx.set_weights(layer, [lyr.weights["seed"]])
    return out


def _forward(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    x, rate = ins[0], lyr.attrs["rate"]
    if mode == "eval" or rate == 0:
        return tf.identity(x), {"mask": tf.ones_like(x)}
    keep = tf.cast(uniform(x, seg.w(lyr, "seed")) >= rate, tf.float32) * (1.0 / (1.0 - rate))
    return x * keep, {"mask": keep}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [g * c.extra["mask"]]


def advance_seed(seg: TfSegment, lyr: Layer) -> None:
    """After a training step: the layer's masks move on (layers without a ``seed`` have no dropout)."""
    if "seed" in lyr.weights:
        seg.vars[f"{lyr.name}/seed"].assign_add([1.0])


register(
    OpSpec(
        "Dropout", "dropout", modules=("Dropout",),
        onnx=decomposed("x * mask in a segment trained on a gradient, the mask a model input the runtime draws "
                        "(OrtSegment seed=); Dropout in the last segment"),
        tfjs=native("SeededDropout (custom layer; mask from a hash of index and a seed the runtime advances)"),
        tflite_flex=native("seeded hash mask"),
        tflite_builtin=native("seeded hash mask (sin, floor, range)"),
        restrictions="trains in every device segment; not bit-comparable with torch (own mask stream)",
        build_module=_build, kinds=("dropout",),
    ),
    LayerKind("dropout", _keras, _forward, _backward, after_step=advance_seed),
)
