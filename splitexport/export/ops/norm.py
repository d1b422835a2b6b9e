"""Normalisation layers: BatchNorm1d / BatchNorm2d, LayerNorm (last dim), GroupNorm."""

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
    if rank == 1 and len(x.shape) == 2:  # N x C x L: statistics over N and L, channels last inside
        c, length = x.shape
        h = b.add(node, "permute", [x], (length, c), suffix="_nlc", dims=(2, 1))
        lyr = _bn_layer(b, node, m, h, "_bn")
        b.add(node, "permute", [lyr], (c, length), dims=(2, 1))
        return
    if len(x.shape) != rank:
        raise ExportError(f"{node.describe()}: unsupported input rank {len(x.shape) + 1}")
    _bn_layer(b, node, m, x, "")


def _bn_layer(b: _Builder, node: _Node, m: Any, x: Layer, suffix: str) -> Layer:
    if not m.affine or not m.track_running_stats or m.momentum is None:
        raise ExportError(
            f"{node.describe()}: only BatchNorm with affine=True, track_running_stats=True and a fixed momentum "
            "is supported"
        )
    lyr = b.add(node, "batchnorm", [x], x.shape, suffix=suffix, epsilon=float(m.eps), momentum=float(m.momentum))
    for key, tkey in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                      ("moving_variance", "running_var")):
        b.param(node, lyr, key, tkey)
    return lyr


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


def _build_layernorm(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    shape = tuple(int(d) for d in m.normalized_shape)
    if len(shape) != 1 or len(x.shape) == 3 or x.shape[-1] != shape[0]:
        raise ExportError(f"{node.describe()}: only LayerNorm over the last dimension of an N x F or N x T x F "
                          f"tensor is supported (normalized_shape={list(shape)}, input {list(x.shape)})")
    affine = bool(m.elementwise_affine)
    bias = affine and getattr(m, "bias", None) is not None
    if affine and not bias:
        raise ExportError(f"{node.describe()}: LayerNorm(bias=False) is not supported")
    lyr = b.add(node, "layernorm", [x], x.shape, epsilon=float(m.eps), affine=affine)
    if affine:
        b.param(node, lyr, "gamma", "weight")
        b.param(node, lyr, "beta", "bias")


def _build_groupnorm(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    if len(x.shape) != 3 or not m.affine:
        raise ExportError(f"{node.describe()}: only affine GroupNorm on N x C x H x W input is supported")
    lyr = b.add(node, "groupnorm", [x], x.shape, epsilon=float(m.eps), groups=int(m.num_groups))
    b.param(node, lyr, "gamma", "weight")
    b.param(node, lyr, "beta", "bias")


def _keras_layernorm(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    a = lyr.attrs
    layer = ctx.L.LayerNormalization(axis=-1, epsilon=a["epsilon"], center=a["affine"], scale=a["affine"],
                                     name=lyr.name)
    out = layer(ins[0])
    if a["affine"]:
        ctx.set_weights(layer, [lyr.weights["gamma"], lyr.weights["beta"]])
    return out


def _keras_groupnorm(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    from .._keras_layers import GroupNorm

    layer = GroupNorm(lyr.attrs["groups"], lyr.attrs["epsilon"], name=lyr.name)
    out = layer(ins[0])
    ctx.set_weights(layer, [lyr.weights["gamma"], lyr.weights["beta"]])
    return out


def _grouped(lyr: Layer, x: Any) -> Any:
    """``x`` (N, ..., C) as (N, M, G, C/G) for GroupNorm, or as is for LayerNorm (statistics over the last axis)."""
    if lyr.kind == "layernorm":
        return x
    c = int(x.shape[-1])
    gr = lyr.attrs["groups"]
    return tf.reshape(x, [-1, int(np.prod([int(d) for d in x.shape[1:-1]])), gr, c // gr])


def _stat_axes(lyr: Layer, x: Any) -> list[int]:
    return [-1] if lyr.kind == "layernorm" else [1, 3]


def _fwd_norm(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    x = ins[0]
    xg = _grouped(lyr, x)
    axes = _stat_axes(lyr, xg)
    mean = tf.reduce_mean(xg, axes, keepdims=True)
    xc = xg - mean
    inv = tf.math.rsqrt(tf.reduce_mean(xc * xc, axes, keepdims=True) + lyr.attrs["epsilon"])
    xhat = tf.reshape(xc * inv, tf.shape(x)) if lyr.kind == "groupnorm" else xc * inv
    y = xhat * seg.w(lyr, "gamma") + seg.w(lyr, "beta") if "gamma" in lyr.weights else xhat
    return y, {"xhat": xhat, "inv": inv}


def _bwd_norm(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    xhat, inv = c.extra["xhat"], c.extra["inv"]
    outer = list(range(len(g.shape) - 1))
    if "gamma" in lyr.weights:
        wgrads[f"{lyr.name}/gamma"] = tf.reduce_sum(g * xhat, outer)
        wgrads[f"{lyr.name}/beta"] = tf.reduce_sum(g, outer)
        g = g * seg.w(lyr, "gamma")
    gg, hg = _grouped(lyr, g), _grouped(lyr, xhat)
    axes = _stat_axes(lyr, gg)
    dx = inv * (gg - tf.reduce_mean(gg, axes, keepdims=True) - hg * tf.reduce_mean(gg * hg, axes, keepdims=True))
    return [tf.reshape(dx, tf.shape(g))]


_BN_RESTRICTIONS = "affine, track_running_stats, fixed momentum"
def _bn_spec(name: str, build: Any, kinds: tuple[str, ...], restrictions: str) -> OpSpec:
    return OpSpec(
        name, "norm", modules=(name,), build_module=build, kinds=kinds, restrictions=restrictions,
        onnx=native("BatchNormalization"),
        tfjs=native("BatchNormalization (runtime patched to torch's unbiased running variance)"),
        tflite_flex=native("batch moments, GradientTape"),
        tflite_builtin=decomposed("explicit batch-norm backward formula"),
    )

register(
    _bn_spec("BatchNorm2d", _build_bn2d, ("batchnorm",), _BN_RESTRICTIONS),
    _bn_spec("BatchNorm1d", _build_bn1d, ("batchnorm", "permute"), _BN_RESTRICTIONS + "; N x C or N x C x L input"),
    LayerKind("batchnorm", _keras, _forward, _backward),
    OpSpec(
        "LayerNorm", "norm", modules=("LayerNorm",),
        onnx=native("LayerNormalization (its optional outputs are added so ORT builds the gradient at opset 17)"),
        tfjs=native("LayerNormalization(axis=-1)"), tflite_flex=native("moments over the last axis"),
        tflite_builtin=decomposed("explicit layer-norm backward formula"),
        restrictions="normalized_shape = the last dim; elementwise_affine with bias, or no affine",
        build_module=_build_layernorm, kinds=("layernorm",),
    ),
    OpSpec(
        "GroupNorm", "norm", modules=("GroupNorm",),
        onnx=decomposed("mean / variance over N x G x -1 before export (ORT has no InstanceNormalization gradient)"),
        tfjs=native("GroupNorm (custom layer, device_runtime/js/src/layers.js)"),
        tflite_flex=native("moments per sample and group"),
        tflite_builtin=decomposed("explicit group-norm backward formula"),
        restrictions="affine, N x C x H x W input",
        build_module=_build_groupnorm, kinds=("groupnorm",),
    ),
    LayerKind("layernorm", _keras_layernorm, _fwd_norm, _bwd_norm),
    LayerKind("groupnorm", _keras_groupnorm, _fwd_norm, _bwd_norm),
)
