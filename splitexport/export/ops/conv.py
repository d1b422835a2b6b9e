"""Convolutions: Conv2d (any groups, incl. depthwise; any dilation) and Conv1d (as a conv2d of height 1).

Groups 1 and depthwise without dilation map to Keras' Conv2D / DepthwiseConv2D. Grouped (1 < groups <
in_channels) and dilated convolutions run as an ordinary (or depthwise) convolution with an *effective*
kernel built from the trained one by differentiable ops (:func:`effective_kernel`): a grouped kernel
tiled over the groups and masked block-diagonal, then spread with zeros between the taps for dilation.
TF.js has no grouped convolution layer and cannot differentiate a dilated convolution (its conv2d
gradient asserts dilation 1), so its custom layer ``TorchConv2D`` (``device_runtime/js/src/layers.js``)
does the same; the builtin-ops TFLite backward pulls the effective kernel's gradient back through
the construction (strided slice, mask, sum over groups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf
from ._tfshared import effective_kernel, group_mask

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[-1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _conv_attrs(node: _Node, m: Any, kernel: tuple[int, int], stride: tuple[int, int],
                dilation: tuple[int, int], padding: tuple[int, int, int, int]) -> dict[str, Any]:
    cin, cout, groups = int(m.in_channels), int(m.out_channels), int(m.groups)
    if m.padding_mode != "zeros":
        raise ExportError(f"{node.describe()}: padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
    return {"kernel": kernel, "strides": stride, "pads": padding, "dilation": dilation, "in_channels": cin,
            "out_channels": cout, "groups": groups}


def _same_pads(k: int, d: int) -> tuple[int, int]:
    total = d * (k - 1)
    return total // 2, total - total // 2


def _add_conv(b: _Builder, node: _Node, m: Any, x: Layer, shape: tuple[int, ...], attrs: dict[str, Any],
              suffix: str = "") -> Layer:
    """The conv2d / depthwise2d layer (groups == in_channels is depthwise, any multiplier)."""
    cin, cout, groups = attrs["in_channels"], attrs["out_channels"], attrs["groups"]
    if groups == cin and groups > 1:
        lyr = b.add(node, "depthwise2d", [x], shape, suffix=suffix, multiplier=cout // cin, **attrs)
        b.param(node, lyr, "depthwise_kernel", "weight")
    else:
        lyr = b.add(node, "conv2d", [x], shape, suffix=suffix, **attrs)
        b.param(node, lyr, "kernel", "weight")
    if m.bias is not None:
        b.param(node, lyr, "bias", "bias")
    return lyr


def _build_conv2d(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    if len(x.shape) != 3:
        raise ExportError(f"{node.describe()}: expects an N x C x H x W input")
    kh, kw = _pair(m.kernel_size)
    sh, sw = _pair(m.stride)
    dh, dw = _pair(m.dilation)
    if isinstance(m.padding, str):
        pads = (0, 0, 0, 0) if m.padding == "valid" else (*_same_pads(kh, dh), *_same_pads(kw, dw))
    else:
        ph, pw = _pair(m.padding)
        pads = (ph, ph, pw, pw)
    attrs = _conv_attrs(node, m, (kh, kw), (sh, sw), (dh, dw), pads)
    h, w, _ = x.shape
    ho = (h + pads[0] + pads[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pads[2] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    _add_conv(b, node, m, x, (ho, wo, attrs["out_channels"]), attrs)


def _build_conv1d(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    """N x C x L as an NHWC image of height 1: permute to (L, C), reshape to (1, L, C), conv2d, and back."""
    if len(x.shape) != 2:
        raise ExportError(f"{node.describe()}: expects an N x C x L input")
    c, length = x.shape
    k, s, d = int(m.kernel_size[0]), int(m.stride[0]), int(m.dilation[0])
    if isinstance(m.padding, str):
        pads = (0, 0) if m.padding == "valid" else _same_pads(k, d)
    else:
        pads = (int(m.padding[0]), int(m.padding[0]))
    attrs = _conv_attrs(node, m, (1, k), (1, s), (1, d), (0, 0, *pads))
    cout = attrs["out_channels"]
    lo = (length + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1
    h = b.add(node, "permute", [x], (length, c), suffix="_nlc", dims=(2, 1))
    h = b.add(node, "reshape", [h], (1, length, c), suffix="_nhwc", target=(1, length, c))
    conv = _add_conv(b, node, m, h, (1, lo, cout), {**attrs, "conv1d": True}, suffix="_conv")
    h = b.add(node, "reshape", [conv], (lo, cout), suffix="_nlc_out", target=(lo, cout))
    b.add(node, "permute", [h], (cout, lo), dims=(2, 1))


def _custom(a: dict[str, Any]) -> bool:
    """Whether the layer needs the effective-kernel path (grouped, or dilated)."""
    return tuple(a.get("dilation", (1, 1))) != (1, 1) or a.get("groups", 1) not in (1, a["in_channels"])


def _kernel_grad(full: Any, a: dict[str, Any], depthwise: bool) -> Any:
    """Pull the effective kernel's gradient back to the trained kernel (the transpose of :func:`effective_kernel`)."""
    dh, dw = a.get("dilation", (1, 1))
    g = full[::dh, ::dw] if (dh, dw) != (1, 1) else full
    groups, cin, cout = a.get("groups", 1), a["in_channels"], a["out_channels"]
    if not depthwise and groups > 1:
        kh, kw = a["kernel"]
        g = g * tf.constant(group_mask(cin, cout, groups))
        g = tf.reduce_sum(tf.reshape(g, [kh, kw, groups, cin // groups, cout]), axis=2)
    return g


def keras_layers_module() -> Any:
    """splitexport.export._keras_layers (imports TensorFlow; only when a Keras model is built)."""
    from .. import _keras_layers

    return _keras_layers


def _keras(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    L, a = ctx.L, lyr.attrs
    t, bt, left, r = a["pads"]
    h = ins[0]
    if any(a["pads"]):
        h = L.ZeroPadding2D(((t, bt), (left, r)), name=f"{lyr.name}_pad")(h)
    layer: Any
    if _custom(a):  # TF.js: no grouped Conv2D, no gradient of a dilated one
        keys = ["kernel" if lyr.kind == "conv2d" else "depthwise_kernel", "bias"]
        layer = keras_layers_module().TorchConv2D(
            a["out_channels"], list(a["kernel"]), list(a["strides"]), list(a["dilation"]), a["groups"],
            a["in_channels"], lyr.kind == "depthwise2d", "bias" in lyr.weights, name=lyr.name)
    elif lyr.kind == "conv2d":
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
        y = tf.nn.conv2d(xp, effective_kernel(seg.w(lyr, "kernel"), a, False), strides, "VALID")
    else:
        y = tf.nn.depthwise_conv2d(xp, effective_kernel(seg.w(lyr, "depthwise_kernel"), a, True), strides, "VALID")
    if "bias" in lyr.weights:
        y = y + seg.w(lyr, "bias")
    return y, {"xp": xp}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    a, x = lyr.attrs, c.x[0]
    xp = c.extra["xp"]
    n, hp, wp, cin = (int(d) for d in xp.shape)
    sh, sw = a["strides"]
    cout = a["out_channels"]
    depthwise = lyr.kind == "depthwise2d"
    if not depthwise:
        kernel = effective_kernel(seg.w(lyr, "kernel"), a, False)
    else:  # depthwise as a block-diagonal full convolution
        m = a["multiplier"]
        dk = effective_kernel(seg.w(lyr, "depthwise_kernel"), a, True)
        kh, kw = int(dk.shape[0]), int(dk.shape[1])
        eye = tf.constant(np.eye(cin, dtype=np.float32).reshape(1, 1, cin, cin, 1))
        kernel = tf.reshape(tf.reshape(dk, [kh, kw, cin, 1, m]) * eye, [kh, kw, cin, cout])
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])  # the effective (dilated) size
    gxp = tf.nn.conv2d_transpose(g, kernel, [n, hp, wp, cin], [1, sh, sw, 1], "VALID")
    t, _, left, _ = a["pads"]
    h, w = int(x.shape[1]), int(x.shape[2])
    gx = tf.slice(gxp, [0, t, left, 0], [n, h, w, cin]) if any(a["pads"]) else gxp
    # dW[i, j, ci, co] = sum_{n, y, x} xp[n, y*s + i, x*s + j, ci] * g[n, y, x, co]
    full = tf.nn.conv2d(tf.transpose(xp, [3, 1, 2, 0]), tf.transpose(g, [1, 2, 0, 3]), [1, 1, 1, 1], "VALID",
                        dilations=[1, sh, sw, 1])
    full = tf.transpose(tf.slice(full, [0, 0, 0, 0], [cin, kh, kw, cout]), [1, 2, 0, 3])
    if not depthwise:
        wgrads[f"{lyr.name}/kernel"] = _kernel_grad(full, a, False)
    else:
        m = a["multiplier"]
        eye = tf.constant(np.eye(cin, dtype=np.float32).reshape(1, 1, cin, cin, 1))
        dfull = tf.reduce_sum(tf.reshape(full, [kh, kw, cin, cin, m]) * eye, axis=3)
        wgrads[f"{lyr.name}/depthwise_kernel"] = _kernel_grad(dfull, a, True)
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
        tfjs=native("ZeroPadding2D + Conv2D / DepthwiseConv2D; grouped or dilated: TorchConv2D (custom layer, "
                    "effective kernel: tiled + block-diagonal mask, zeros between dilated taps)"),
        tflite_flex=native("conv2d / depthwise_conv2d (grouped / dilated: on the effective kernel), GradientTape"),
        tflite_builtin=decomposed("dx by conv2d_transpose, dW by a dilated conv2d, pulled back through the effective "
                                  "kernel; depthwise as block-diagonal conv"),
        restrictions="any groups (incl. depthwise, any multiplier); any dilation; zero padding (incl. 'same')",
        build_module=_build_conv2d,
        kinds=("conv2d", "depthwise2d"),
    ),
    OpSpec(
        "Conv1d", "conv", modules=("Conv1d",),
        onnx=native("Conv"), tfjs=decomposed("Permute + Reshape + Conv2D / DepthwiseConv2D / TorchConv2D of height 1"),
        tflite_flex=decomposed("conv2d of height 1"), tflite_builtin=decomposed("as Conv2d"),
        restrictions="as Conv2d (any groups and dilation; zero padding)",
        build_module=_build_conv1d, kinds=("permute", "reshape", "conv2d", "depthwise2d"),
    ),
    LayerKind("conv2d", _keras, _forward, _backward, layout=_layout),
    LayerKind("depthwise2d", _keras, _forward, _backward, layout=_layout),
)
