"""Normalisation layers: BatchNorm1d / BatchNorm2d."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def count(x: Any, axes: list[int]) -> Any:
    """Number of elements reduced over ``axes`` (static when the shape is known)."""
    dims = [x.shape[i] for i in axes]
    if all(d is not None for d in dims):
        return tf.constant(float(np.prod([int(d) for d in dims])))
    return tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)


def _bn(b: _Builder, node: _Node, m: Any, x: Layer, rank: int) -> None:
    if len(x.shape) != rank:
        raise ExportError(f"{node.describe()}: unsupported input rank {len(x.shape) + 1}")
    if not m.affine or not m.track_running_stats or m.momentum is None:
        raise ExportError(
            f"{node.describe()}: only BatchNorm with affine=True, track_running_stats=True and a fixed momentum "
            "is supported"
        )
    lyr = b.add(node, "batchnorm", [x], x.shape, epsilon=float(m.eps), momentum=float(m.momentum))
    for key, tkey in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                      ("moving_variance", "running_var")):
        b.param(node, lyr, key, tkey)


def _build_bn2d(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    _bn(b, node, m, x, 3)


def _build_bn1d(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    _bn(b, node, m, x, 1)


def _keras(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    a = lyr.attrs
    layer = ctx.L.BatchNormalization(axis=-1, momentum=1.0 - a["momentum"], epsilon=a["epsilon"], name=lyr.name)
    out = layer(ins[0])
    ctx.set_weights(layer, [lyr.weights[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
    return out


def _forward(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    a, x = lyr.attrs, ins[0]
    axes = list(range(len(x.shape) - 1))
    gamma, beta = seg.w(lyr, "gamma"), seg.w(lyr, "beta")
    eps = a["epsilon"]
    if mode == "eval":
        inv = tf.math.rsqrt(seg.w(lyr, "moving_variance") + eps)
        return (x - seg.w(lyr, "moving_mean")) * (inv * gamma) + beta, {}
    mean = tf.reduce_mean(x, axes)
    xc = x - mean
    var = tf.reduce_mean(xc * xc, axes)
    inv = tf.math.rsqrt(var + eps)
    xhat = xc * inv
    if update:
        n = count(x, axes)
        m = a["momentum"]
        mm, mv = seg.vars[f"{lyr.name}/moving_mean"], seg.vars[f"{lyr.name}/moving_variance"]
        mm.assign(mm * (1.0 - m) + tf.stop_gradient(mean) * m)
        mv.assign(mv * (1.0 - m) + tf.stop_gradient(var) * (m * n / tf.maximum(n - 1.0, 1.0)))
    return xhat * gamma + beta, {"xhat": xhat, "inv": inv}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]
    axes = list(range(len(x.shape) - 1))
    n = float(math.prod(int(x.shape[i]) for i in axes))
    xhat, inv = c.extra["xhat"], c.extra["inv"]
    dbeta = tf.reduce_sum(g, axes)
    dgamma = tf.reduce_sum(g * xhat, axes)
    wgrads[f"{lyr.name}/gamma"] = dgamma
    wgrads[f"{lyr.name}/beta"] = dbeta
    scale = seg.w(lyr, "gamma") * inv * (1.0 / n)
    return [scale * (g * n - dbeta - xhat * dgamma)]


_BN_COMMON = {
    "onnx": native("BatchNormalization"),
    "tfjs": native("BatchNormalization (runtime patched to torch's unbiased running variance)"),
    "tflite_flex": native("batch moments, GradientTape"),
    "tflite_builtin": decomposed("explicit batch-norm backward formula"),
    "restrictions": "affine, track_running_stats, fixed momentum",
}

register(
    OpSpec("BatchNorm2d", "norm", modules=("BatchNorm2d",), build_module=_build_bn2d, kinds=("batchnorm",),
           **_BN_COMMON),  # type: ignore[arg-type]
    OpSpec("BatchNorm1d", "norm", modules=("BatchNorm1d",), build_module=_build_bn1d, kinds=("batchnorm",),
           **_BN_COMMON),  # type: ignore[arg-type]
    LayerKind("batchnorm", _keras, _forward, _backward),
)
