"""Pooling: MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _build_maxpool(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    if pair(m.padding) != (0, 0) or pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
        raise ExportError(
            f"{node.describe()}: only MaxPool2d without padding, dilation, ceil_mode or return_indices is supported"
        )
    if len(x.shape) != 3:
        raise ExportError(f"{node.describe()}: expects an N x C x H x W input")
    h, w, c = x.shape
    b.add(node, "maxpool2d", [x], ((h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1, c), pool=k, strides=s)


def _build_gap(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    size = m.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size != (1, 1) or len(x.shape) != 3:
        raise ExportError(f"{node.describe()}: only AdaptiveAvgPool2d(1) (global average pooling) is supported")
    b.add(node, "gap", [x], (1, 1, x.shape[2]))


def _build_avgpool(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    if pair(m.padding) != (0, 0) or m.ceil_mode or m.divisor_override is not None:
        raise ExportError(f"{node.describe()}: only AvgPool2d without padding, ceil_mode or divisor_override is "
                          "supported")
    if len(x.shape) != 3:
        raise ExportError(f"{node.describe()}: expects an N x C x H x W input")
    h, w, c = x.shape
    b.add(node, "avgpool2d", [x], ((h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1, c), pool=k, strides=s)


def _keras_avgpool(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    a = lyr.attrs
    return ctx.L.AveragePooling2D(a["pool"], strides=a["strides"], padding="valid", name=lyr.name)(ins[0])


def _fwd_avgpool(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.nn.avg_pool2d(ins[0], list(lyr.attrs["pool"]), list(lyr.attrs["strides"]), "VALID"), {}


def _bwd_avgpool(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    """A transposed convolution with a block-diagonal constant kernel of 1 / (kh * kw)."""
    x = c.x[0]
    kh, kw = lyr.attrs["pool"]
    sh, sw = lyr.attrs["strides"]
    n, h, w, ch = (int(d) for d in x.shape)
    kernel = np.broadcast_to(np.eye(ch, dtype=np.float32) / (kh * kw), (kh, kw, ch, ch))
    return [tf.nn.conv2d_transpose(g, tf.constant(np.ascontiguousarray(kernel)), [n, h, w, ch], [1, sh, sw, 1],
                                   "VALID")]


def _keras_maxpool(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    a = lyr.attrs
    return ctx.L.MaxPooling2D(a["pool"], strides=a["strides"], padding="valid", name=lyr.name)(ins[0])


def _keras_gap(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    h = ctx.L.GlobalAveragePooling2D(name=lyr.name)(ins[0])
    return ctx.L.Reshape(lyr.shape, name=f"{lyr.name}_keepdims")(h)


def _fwd_maxpool(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.nn.max_pool2d(ins[0], list(lyr.attrs["pool"]), list(lyr.attrs["strides"]), "VALID"), {}


def _fwd_gap(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.reduce_mean(ins[0], [1, 2], keepdims=True), {}


def _maxpool_refusal(lyr: Layer) -> str | None:
    kh, kw = lyr.attrs["pool"]
    if (kh, kw) != tuple(lyr.attrs["strides"]) or kh != kw:
        return "the builtin-ops TFLite variant supports square MaxPool2d with kernel == stride only"
    return None


def _bwd_maxpool(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    """Route ``g`` to the first maximum of each window (torch's choice), for kernel == stride."""
    why = _maxpool_refusal(lyr)
    if why:
        raise ExportError(f"{lyr.source}: {why}")
    x = c.x[0]
    kh, kw = lyr.attrs["pool"]
    n, h, w, ch = (int(d) for d in x.shape)
    ho, wo = h // kh, w // kw
    xc = tf.slice(x, [0, 0, 0, 0], [n, ho * kh, wo * kw, ch]) if (ho * kh, wo * kw) != (h, w) else x
    win = tf.reshape(tf.nn.space_to_depth(xc, kh), [n, ho, wo, kh * kw, ch])
    first = tf.one_hot(tf.argmax(win, axis=3, output_type=tf.int32), kh * kw, axis=3, dtype=tf.float32)
    routed = tf.reshape(first * tf.expand_dims(g, 3), [n, ho, wo, kh * kw * ch])
    gx = tf.nn.depth_to_space(routed, kh)
    if (ho * kh, wo * kw) != (h, w):
        gx = tf.pad(gx, [[0, 0], [0, h - ho * kh], [0, w - wo * kw], [0, 0]])
    return [gx]


def _bwd_gap(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]
    h, w = int(x.shape[1]), int(x.shape[2])
    return [tf.broadcast_to(g * (1.0 / (h * w)), tf.shape(x))]


register(
    OpSpec(
        "MaxPool2d", "pool", modules=("MaxPool2d",),
        onnx=native("MaxPool"), tfjs=native("MaxPooling2D"), tflite_flex=native("max_pool2d"),
        tflite_builtin=decomposed("space_to_depth + argmax + one_hot routing; square kernel == stride only"),
        restrictions="no padding, dilation 1, floor mode",
        build_module=_build_maxpool, kinds=("maxpool2d",),
    ),
    OpSpec(
        "AvgPool2d", "pool", modules=("AvgPool2d",),
        onnx=decomposed("depthwise Conv with constant 1/k^2 weights before export (AveragePool's gradient crashes ORT with a dynamic batch)"),
        tfjs=native("AveragePooling2D"), tflite_flex=native("avg_pool2d"),
        tflite_builtin=decomposed("conv2d_transpose with a constant 1/(kh*kw) kernel"),
        restrictions="no padding, floor mode, no divisor_override",
        build_module=_build_avgpool, kinds=("avgpool2d",),
    ),
    OpSpec(
        "AdaptiveAvgPool2d", "pool", modules=("AdaptiveAvgPool2d",),
        onnx=native("GlobalAveragePool"), tfjs=native("GlobalAveragePooling2D + Reshape"),
        tflite_flex=native("reduce_mean"), tflite_builtin=decomposed("broadcast of g / (H*W)"),
        restrictions="output size 1 (global average pooling)",
        build_module=_build_gap, kinds=("gap",),
    ),
    LayerKind("maxpool2d", _keras_maxpool, _fwd_maxpool, _bwd_maxpool, builtin_refusal=_maxpool_refusal),
    LayerKind("gap", _keras_gap, _fwd_gap, _bwd_gap),
    LayerKind("avgpool2d", _keras_avgpool, _fwd_avgpool, _bwd_avgpool),
)
