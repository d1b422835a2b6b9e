"""Dropout with seeded masks: the forward that sends the activation and the training step draw the same mask.

A device segment runs ``forward`` (the activation it sends), then, when the gradient comes
back, a training step that recomputes the forward. Independent random masks would make that
step train a different network than the one whose output was sent. So every dropout layer
draws its mask from a hash of (element index, ``seed``), where ``seed`` is a non-trainable
state variable of the layer (saved and restored with the weights): ``forward`` and ``train``
use the current seed, and every training step advances it by one afterwards. Masks are
Bernoulli(1 - p) per element, scaled by 1 / (1 - p) as torch does, but not torch's random
stream: dropout runs are not bit-comparable with torch. A plain Dropout is site 0 of its layer (hash
seed ``seed * SITES``, :func:`._tfshared.site_keep`); the dropouts inside attention layers are sites
0..3 of theirs (:mod:`.attention`). Every layer's seed starts at a value of its qualified name
(:func:`add_seed`), chosen so that no two dropout sites of a segment ever hash with the same seed.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf
from ._tfshared import HASH, SITES, site_keep

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache

def dropout_sites(lyr: Layer) -> list[int]:
    """The sites whose masks ``lyr`` draws: plain Dropout site 0, attention layers the sites of ``attrs["dropout"]``
    (each with rate > 0)."""
    rates = [lyr.attrs["rate"]] if lyr.kind == "dropout" else lyr.attrs.get("dropout", [])
    return [k for k, rate in enumerate(rates) if rate > 0]


def add_seed(b: _Builder, node: _Node, lyr: Layer) -> None:
    """Give ``lyr`` its ``seed`` state (the last weight), starting where none of its sites collides with another.

    Site ``k`` of a layer with seed ``s`` hashes with ``(s * SITES + k) mod P`` (P = 1009, the hash's seed period),
    and every layer's seed advances by one per step, so two sites draw the same mask of a shape at every step or
    never. The start is CRC32 of the qualified name mod P, moved on while one of the layer's sites would hash like a
    site of a dropout layer built before it (plain or attention).
    """
    period = int(HASH[2])
    taken = {(SITES * int(other.weights["seed"][0]) + k) % period
             for other in b.layers.values() if "seed" in other.weights for k in dropout_sites(other)}
    sites = dropout_sites(lyr)
    start = zlib.crc32(node.path.encode()) % period
    for seed in ((start + i) % period for i in range(period)):
        if not any((SITES * seed + k) % period in taken for k in sites):
            lyr.weights["seed"] = np.array([seed], np.float32)
            return
    raise ExportError(f"{node.describe()}: more dropout masks in one device segment than the seeded hash keeps "
                      f"apart ({period}); cut so that fewer Dropout layers run in this segment")


def _build(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    add_seed(b, node, b.add(node, "dropout", [x], x.shape, rate=float(m.p)))


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
    keep = site_keep(x, rate, seg.w(lyr, "seed"), 0)
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
        restrictions="trains in every device segment; not bit-comparable with torch (own mask stream); every "
                     "dropout layer of a segment draws its own masks (TF.js, TFLite: seeds start apart, from the "
                     "layer's name; at most 1009 masks per segment)",
        build_module=_build, kinds=("dropout",),
    ),
    LayerKind("dropout", _keras, _forward, _backward, after_step=advance_seed),
)
