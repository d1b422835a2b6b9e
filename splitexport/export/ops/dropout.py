"""Dropout with seeded masks: the forward that sends the activation and the training step draw the same mask.

A device segment runs ``forward`` (the activation it sends), then, when the gradient comes
back, a training step that recomputes the forward. Independent random masks would make that
step train a different network than the one whose output was sent. So every dropout layer
draws its mask from a hash of (element index, ``seed``), where ``seed`` is a non-trainable
state variable of the layer (saved and restored with the weights): ``forward`` and ``train``
use the current seed, and every training step advances it by one afterwards. Masks are
Bernoulli(1 - p) per element, scaled by 1 / (1 - p) as torch does, but not torch's random
stream: dropout runs are not bit-comparable with torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache

HASH = (251.0, 241.0, 1009.0, 12.9898, 78.233, 37.719, 43758.5453)
"""Constants of the mask hash u = fract(sin(a*12.9898 + b*78.233 + s*37.719) * 43758.5453) with
a = i mod 251, b = floor(i / 251) mod 241, s = seed mod 1009 (i: flat element index); the
same in ``_keras_layers.SeededDropout`` and ``device_runtime/js/src/layers.js``."""


def uniform(x: Any, seed: Any) -> Any:
    """Pseudo-random numbers in [0, 1) of ``x``'s shape, from ``seed`` (a float tensor of shape [1])."""
    ma, mb, ms, ka, kb, ks, scale = HASH
    per_sample = [int(d) for d in x.shape[1:]]
    numel = int(np.prod(per_sample))
    # flat element index = sample * numel + index within the sample (static shapes but the batch)
    within = tf.constant(np.arange(numel, dtype=np.float32).reshape([1, *per_sample]))
    sample = tf.reshape(tf.cast(tf.range(tf.shape(x)[0]), tf.float32), [-1] + [1] * len(per_sample))
    i = within + sample * float(numel)
    a = i - tf.floor(i / ma) * ma
    q = tf.floor(i / ma)
    b = q - tf.floor(q / mb) * mb
    s = seed - tf.floor(seed / ms) * ms
    v = tf.sin(a * ka + b * kb + s * ks) * scale
    return v - tf.floor(v)


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


def _after_step(seg: TfSegment, lyr: Layer) -> None:
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
    LayerKind("dropout", _keras, _forward, _backward, after_step=_after_step),
)
