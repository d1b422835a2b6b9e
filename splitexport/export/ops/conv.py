"""Convolutions: Conv2d (groups 1 and depthwise) and Conv1d (as a conv2d of height 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def _build_conv2d(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    if len(x.shape) != 3:
        raise ExportError(f"{node.describe()}: expects an N x C x H x W input")
    if m.padding_mode != "zeros":
        raise ExportError(f"{node.describe()}: padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
    if tuple(m.dilation) != (1, 1):
        raise ExportError(f"{node.describe()}: dilation {tuple(m.dilation)} is not supported (only 1)")
    kh, kw = (int(k) for k in m.kernel_size)
    sh, sw = (int(s) for s in m.stride)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pads = (0, 0, 0, 0)
        else:
            th, tw = kh - 1, kw - 1
            pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = (int(p) for p in m.padding)
        pads = (ph, ph, pw, pw)
    cin, cout, groups = int(m.in_channels), int(m.out_channels), int(m.groups)
    h, w, _ = x.shape
    ho = (h + pads[0] + pads[1] - kh) // sh + 1
    wo = (w + pads[2] + pads[3] - kw) // sw + 1
    attrs: dict[str, Any] = {"kernel": (kh, kw), "strides": (sh, sw), "pads": pads, "in_channels": cin,
                             "out_channels": cout}
    if groups == 1:
        lyr = b.add(node, "conv2d", [x], (ho, wo, cout), **attrs)
        b.param(node, lyr, "kernel", "weight")
    elif groups == cin:
        lyr = b.add(node, "depthwise2d", [x], (ho, wo, cout), multiplier=cout // cin, **attrs)
        b.param(node, lyr, "depthwise_kernel", "weight")
    else:
        raise ExportError(
            f"{node.describe()}: groups={groups} is not supported (TF.js has no grouped convolution); "
            "use groups=1 or depthwise (groups=in_channels)"
        )
    if m.bias is not None:
        b.param(node, lyr, "bias", "bias")


def _build_conv1d(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    """N x C x L as an NHWC image of height 1: permute to (L, C), reshape to (1, L, C), conv2d, and back."""
    if len(x.shape) != 2:
        raise ExportError(f"{node.describe()}: expects an N x C x L input")
    if m.padding_mode != "zeros" or int(m.dilation[0]) != 1:
        raise ExportError(f"{node.describe()}: only zero padding and dilation 1 are supported")
    c, length = x.shape
    k, s = int(m.kernel_size[0]), int(m.stride[0])
    if isinstance(m.padding, str):
        pads = (0, 0) if m.padding == "valid" else ((k - 1) // 2, k - 1 - (k - 1) // 2)
    else:
        pads = (int(m.padding[0]), int(m.padding[0]))
    cin, cout, groups = int(m.in_channels), int(m.out_channels), int(m.groups)
    if groups not in (1, cin):
        raise ExportError(f"{node.describe()}: groups={groups} is not supported; use groups=1 or depthwise "
                          "(groups=in_channels)")
    lo = (length + pads[0] + pads[1] - k) // s + 1
    h = b.add(node, "permute", [x], (length, c), suffix="_nlc", dims=(2, 1))
    h = b.add(node, "reshape", [h], (1, length, c), suffix="_nhwc", target=(1, length, c))
    attrs: dict[str, Any] = {"kernel": (1, k), "strides": (1, s), "pads": (0, 0, *pads), "in_channels": cin,
                             "out_channels": cout}
    if groups == 1:
        conv = b.add(node, "conv2d", [h], (1, lo, cout), suffix="_conv", conv1d=True, **attrs)
        b.param(node, conv, "kernel", "weight")
    else:
        conv = b.add(node, "depthwise2d", [h], (1, lo, cout), suffix="_conv", conv1d=True, multiplier=cout // cin,
                     **attrs)
        b.param(node, conv, "depthwise_kernel", "weight")
    if m.bias is not None:
        b.param(node, conv, "bias", "bias")
    h = b.add(node, "reshape", [conv], (lo, cout), suffix="_nlc_out", target=(lo, cout))
    b.add(node, "permute", [h], (cout, lo), dims=(2, 1))


def _keras(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    L, a = ctx.L, lyr.attrs
    t, bt, left, r = a["pads"]
    h = ins[0]
    if any(a["pads"]):
        h = L.ZeroPadding2D(((t, bt), (left, r)), name=f"{lyr.name}_pad")(h)
    layer: Any
    if lyr.kind == "conv2d":
        layer = L.Conv2D(a["out_channels"], a["kernel"], strides=a["strides"], padding="valid",
                         use_bias="bias" in lyr.weights, name=lyr.name)
        keys = ["kernel", "bias"]
    else:
        layer = L.DepthwiseConv2D(a["kernel"], strides=a["strides"], padding="valid", depth_multiplier=a["multiplier"],
                                  use_bias="bias" in lyr.weights, name=lyr.name)
        keys = ["depthwise_kernel", "bias"]
    out = layer(h)
    ctx.set_weights(layer, [lyr.weights[k] for k in keys if k in lyr.weights])
    return out


def _forward(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    a, x = lyr.attrs, ins[0]
    t, b, left, r = a["pads"]
    xp = tf.pad(x, [[0, 0], [t, b], [left, r], [0, 0]]) if any(a["pads"]) else x
    strides = [1, a["strides"][0], a["strides"][1], 1]
    if lyr.kind == "conv2d":
        y = tf.nn.conv2d(xp, seg.w(lyr, "kernel"), strides, "VALID")
    else:
        y = tf.nn.depthwise_conv2d(xp, seg.w(lyr, "depthwise_kernel"), strides, "VALID")
    if "bias" in lyr.weights:
        y = y + seg.w(lyr, "bias")
    return y, {"xp": xp}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    a, x = lyr.attrs, c.x[0]
    xp = c.extra["xp"]
    n, hp, wp, cin = (int(d) for d in xp.shape)
    kh, kw = a["kernel"]
    sh, sw = a["strides"]
    cout = a["out_channels"]
    if lyr.kind == "conv2d":
        kernel = seg.w(lyr, "kernel")
    else:  # depthwise as a block-diagonal full convolution
        m = a["multiplier"]
        eye = tf.constant(np.eye(cin, dtype=np.float32).reshape(1, 1, cin, cin, 1))
        kernel = tf.reshape(tf.reshape(seg.w(lyr, "depthwise_kernel"), [kh, kw, cin, 1, m]) * eye, [kh, kw, cin, cout])
    gxp = tf.nn.conv2d_transpose(g, kernel, [n, hp, wp, cin], [1, sh, sw, 1], "VALID")
    t, _, left, _ = a["pads"]
    h, w = int(x.shape[1]), int(x.shape[2])
    gx = tf.slice(gxp, [0, t, left, 0], [n, h, w, cin]) if any(a["pads"]) else gxp
    # dW[i, j, ci, co] = sum_{n, y, x} xp[n, y*s + i, x*s + j, ci] * g[n, y, x, co]
    full = tf.nn.conv2d(tf.transpose(xp, [3, 1, 2, 0]), tf.transpose(g, [1, 2, 0, 3]), [1, 1, 1, 1], "VALID",
                        dilations=[1, sh, sw, 1])
    full = tf.transpose(tf.slice(full, [0, 0, 0, 0], [cin, kh, kw, cout]), [1, 2, 0, 3])
    if lyr.kind == "conv2d":
        wgrads[f"{lyr.name}/kernel"] = full
    else:
        m = a["multiplier"]
        eye = tf.constant(np.eye(cin, dtype=np.float32).reshape(1, 1, cin, cin, 1))
        wgrads[f"{lyr.name}/depthwise_kernel"] = tf.reduce_sum(tf.reshape(full, [kh, kw, cin, cin, m]) * eye, axis=3)
    if "bias" in lyr.weights:
        wgrads[f"{lyr.name}/bias"] = tf.reduce_sum(g, [0, 1, 2])
    return [gx]


def _layout(lyr: Layer, key: str) -> str:
    one_d = "1d" if lyr.attrs.get("conv1d") else ""
    if key == "kernel":
        return f"conv2d{one_d}"
    if key == "depthwise_kernel":
        return f"depthwise2d{one_d}:{lyr.attrs['multiplier']}"
    return "identity"


register(
    OpSpec(
        "Conv2d",
        "conv",
        modules=("Conv2d",),
        onnx=native("Conv"),
        tfjs=native("ZeroPadding2D + Conv2D / DepthwiseConv2D"),
        tflite_flex=native("conv2d / depthwise_conv2d, GradientTape"),
        tflite_builtin=decomposed("dx by conv2d_transpose, dW by a dilated conv2d; depthwise as block-diagonal conv"),
        restrictions="groups 1 or in_channels (depthwise, any multiplier); zero padding (incl. 'same'); dilation 1",
        build_module=_build_conv2d,
        kinds=("conv2d", "depthwise2d"),
    ),
    OpSpec(
        "Conv1d", "conv", modules=("Conv1d",),
        onnx=native("Conv"), tfjs=decomposed("Permute + Reshape + Conv2D / DepthwiseConv2D of height 1"),
        tflite_flex=decomposed("conv2d of height 1"), tflite_builtin=decomposed("as Conv2d"),
        restrictions="groups 1 or in_channels; zero padding; dilation 1",
        build_module=_build_conv1d, kinds=("permute", "reshape", "conv2d", "depthwise2d"),
    ),
    LayerKind("conv2d", _keras, _forward, _backward, layout=_layout),
    LayerKind("depthwise2d", _keras, _forward, _backward, layout=_layout),
)
