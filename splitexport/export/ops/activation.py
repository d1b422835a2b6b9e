"""Elementwise activations: ReLU, ReLU6, LeakyReLU, Sigmoid, Tanh, GELU (erf and tanh), SiLU, Hardswish,
Hardsigmoid, and Softmax."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, refused, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def unary(kind: str) -> Any:
    """Module mapping of an activation without settings: one IR layer of ``kind``."""

    def build(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
        b.add(node, kind, [x], x.shape)

    return build


def unary_function(kind: str) -> Any:
    """Function mapping of ``f(x)`` / ``f(x, inplace)`` / ``x.f()``: one IR layer of ``kind``."""

    def build(b: _Builder, node: _Node) -> None:
        args, kw = list(node.args), dict(node.kwargs)
        kw.pop("inplace", None)
        if len(args) > 1 and args[1] is False:
            args = args[:1]
        if len(args) != 1 or kw:
            raise ExportError(f"{node.describe()}: unsupported arguments")
        x = b.ref(args[0], node)
        b.add(node, kind, [x], x.shape)

    return build


def _gelu_kind(node: _Node, approx: Any) -> str:
    if approx not in ("none", "tanh"):
        raise ExportError(f"{node.describe()}: approximate={approx!r} is not supported ('none' or 'tanh')")
    return "gelu" if approx == "none" else "gelu_tanh"


def _build_gelu(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    b.add(node, _gelu_kind(node, m.approximate), [x], x.shape)


def _build_gelu_function(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    approx = kw.pop("approximate", args[1] if len(args) > 1 else "none")
    x = b.ref(args[0], node)
    b.add(node, _gelu_kind(node, approx), [x], x.shape)


def _build_leaky(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    b.add(node, "leaky_relu", [x], x.shape, slope=float(m.negative_slope))


def _build_softmax(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    _softmax(b, node, x, m.dim)


def _build_softmax_function(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    dim = kw.pop("dim", args[1] if len(args) > 1 else None)
    kw.pop("_stacklevel", None)
    if kw.pop("dtype", None) is not None or kw:
        raise ExportError(f"{node.describe()}: unsupported arguments {sorted(kw)}")
    _softmax(b, node, b.ref(args[0], node), dim)


def _softmax(b: _Builder, node: _Node, x: Layer, dim: Any) -> None:
    rank = len(x.shape) + 1
    if dim is None or int(dim) not in (-1, rank - 1) or rank == 4:
        raise ExportError(f"{node.describe()}: Softmax is supported over the last dimension of an N x F or N x T x F "
                          "tensor only (dim=-1)")
    b.add(node, "softmax", [x], x.shape)


def _keras_relu(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.ReLU(name=lyr.name)(ins[0])


_KERAS_ACTIVATION = {"sigmoid": "sigmoid", "tanh": "tanh", "gelu": "gelu", "relu6": "relu6", "silu": "swish"}


def _keras_activation(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Activation(_KERAS_ACTIVATION[lyr.kind], name=lyr.name)(ins[0])


def _keras_torch_activation(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    from .._keras_layers import TorchActivation

    return TorchActivation(lyr.kind, name=lyr.name)(ins[0])


def _keras_leaky(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.LeakyReLU(lyr.attrs["slope"], name=lyr.name)(ins[0])


def _keras_softmax(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Softmax(axis=-1, name=lyr.name)(ins[0])


def _fwd(fn: Any) -> Any:
    def forward(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
        return fn(ins[0]), {}

    return forward


def _gelu(x: Any) -> Any:
    return 0.5 * x * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))


def _bwd_relu(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [g * tf.cast(c.y > 0.0, tf.float32)]


def _bwd_sigmoid(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [g * c.y * (1.0 - c.y)]


def _bwd_tanh(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [g * (1.0 - c.y * c.y)]


def _bwd_gelu(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]
    cdf = 0.5 * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = tf.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return [g * (cdf + x * pdf)]


_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x: Any) -> Any:
    return 0.5 * x * (1.0 + tf.math.tanh(_C * (x + 0.044715 * x * x * x)))


def _fwd_leaky(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    x = ins[0]
    return tf.where(x > 0.0, x, x * lyr.attrs["slope"]), {}


def _bwd_leaky(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [tf.where(c.x[0] > 0.0, g, g * lyr.attrs["slope"])]


def _bwd_relu6(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]
    return [g * tf.cast(x > 0.0, tf.float32) * tf.cast(x < 6.0, tf.float32)]


def _bwd_silu(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]
    s = tf.math.sigmoid(x)
    return [g * (s * (1.0 + x * (1.0 - s)))]


def _hardsigmoid(x: Any) -> Any:
    return tf.minimum(tf.maximum(x + 3.0, 0.0), 6.0) * (1.0 / 6.0)


def _bwd_hardsigmoid(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]
    return [g * (1.0 / 6.0) * tf.cast(x > -3.0, tf.float32) * tf.cast(x < 3.0, tf.float32)]


def _bwd_hardswish(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]  # torch: 0 below -3, x/3 + 0.5 up to 3, 1 above
    mid = tf.cast(x >= -3.0, tf.float32) * tf.cast(x <= 3.0, tf.float32)
    return [g * (mid * (x * (1.0 / 3.0) + 0.5) + tf.cast(x > 3.0, tf.float32))]


def _bwd_gelu_tanh(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]
    t = tf.math.tanh(_C * (x + 0.044715 * x * x * x))
    return [g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3.0 * 0.044715 * x * x))]


def _bwd_softmax(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    y = c.y
    return [y * (g - tf.reduce_sum(g * y, axis=-1, keepdims=True))]


def _gelu_builtin(lyr: Layer) -> str | None:
    return "approximate='none' needs erf, which has no builtin TFLite kernel; approximate='tanh' is supported"


register(
    OpSpec(
        "ReLU", "activation", modules=("ReLU",), fn="relu", functions=(torch.relu, F.relu), methods=("relu",),
        aten=("aten.relu",), aten_args=("input",),
        onnx=native("Relu"), tfjs=native("ReLU"), tflite_flex=native("relu"),
        tflite_builtin=decomposed("mask multiply"),
        build_module=unary("relu"), build_function=unary_function("relu"), kinds=("relu",),
    ),
    OpSpec(
        "Sigmoid", "activation", modules=("Sigmoid",), fn="sigmoid", functions=(torch.sigmoid,),
        methods=("sigmoid",), aten=("aten.sigmoid",), aten_args=("input",),
        onnx=native("Sigmoid"), tfjs=native("Activation('sigmoid')"), tflite_flex=native("sigmoid"),
        tflite_builtin=decomposed("y * (1 - y)"),
        build_module=unary("sigmoid"), build_function=unary_function("sigmoid"), kinds=("sigmoid",),
    ),
    OpSpec(
        "Tanh", "activation", modules=("Tanh",), fn="tanh", functions=(torch.tanh,), methods=("tanh",),
        aten=("aten.tanh",), aten_args=("input",),
        onnx=native("Tanh"), tfjs=native("Activation('tanh')"), tflite_flex=native("tanh"),
        tflite_builtin=decomposed("1 - y^2"),
        build_module=unary("tanh"), build_function=unary_function("tanh"), kinds=("tanh",),
    ),
    OpSpec(
        "ReLU6", "activation", modules=("ReLU6",), fn="relu6", functions=(F.relu6,), aten=("aten.relu6",),
        aten_args=("input",),
        onnx=native("Clip(0, 6)"), tfjs=native("Activation('relu6')"), tflite_flex=native("relu6"),
        tflite_builtin=decomposed("mask multiply (0 < x < 6)"),
        build_module=unary("relu6"), build_function=unary_function("relu6"), kinds=("relu6",),
    ),
    OpSpec(
        "LeakyReLU", "activation", modules=("LeakyReLU",),
        onnx=native("LeakyRelu"), tfjs=native("LeakyReLU"), tflite_flex=native("where(x > 0, x, a*x)"),
        tflite_builtin=decomposed("where"),
        build_module=_build_leaky, kinds=("leaky_relu",),
    ),
    OpSpec(
        "SiLU", "activation", modules=("SiLU",), fn="silu", functions=(F.silu,), aten=("aten.silu",),
        aten_args=("input",),
        onnx=native("Sigmoid * x"), tfjs=native("Activation('swish')"), tflite_flex=native("x * sigmoid(x)"),
        tflite_builtin=decomposed("s * (1 + x (1 - s))"),
        build_module=unary("silu"), build_function=unary_function("silu"), kinds=("silu",),
    ),
    OpSpec(
        "Hardswish", "activation", modules=("Hardswish",), fn="hardswish", functions=(F.hardswish,),
        aten=("aten.hardswish",), aten_args=("input",),
        onnx=decomposed("nn.Hardswish: x * clip(x + 3, 0, 6) / 6 before export (ORT has no HardSwish gradient); F.hardswish refused"),
        tfjs=native("TorchActivation('hardswish') (custom layer, device_runtime/js/src/layers.js)"),
        tflite_flex=native("x * relu6(x + 3) / 6"), tflite_builtin=decomposed("piecewise-linear mask"),
        build_module=unary("hardswish"), build_function=unary_function("hardswish"), kinds=("hardswish",),
    ),
    OpSpec(
        "Hardsigmoid", "activation", modules=("Hardsigmoid",), fn="hardsigmoid", functions=(F.hardsigmoid,),
        aten=("aten.hardsigmoid",), aten_args=("input",),
        onnx=decomposed("nn.Hardsigmoid: clip(x + 3, 0, 6) / 6 before export (ORT has no HardSigmoid gradient); F.hardsigmoid refused"),
        tfjs=native("TorchActivation('hardsigmoid') (custom layer; Keras' hard_sigmoid is 0.2x + 0.5)"),
        tflite_flex=native("relu6(x + 3) / 6"), tflite_builtin=decomposed("mask / 6"),
        build_module=unary("hardsigmoid"), build_function=unary_function("hardsigmoid"), kinds=("hardsigmoid",),
    ),
    OpSpec(
        "Softmax", "activation", modules=("Softmax",), fn="softmax", functions=(F.softmax, torch.softmax),
        methods=("softmax",), aten=("aten.softmax",), aten_args=("input", "dim", "dtype"),
        onnx=native("Softmax"), tfjs=native("Softmax(axis=-1)"), tflite_flex=native("softmax"),
        tflite_builtin=decomposed("y * (g - sum(g * y))"),
        restrictions="over the last dim of N x F or N x T x F",
        build_module=_build_softmax, build_function=_build_softmax_function, kinds=("softmax",),
    ),
    OpSpec(
        "GELU", "activation", modules=("GELU",), fn="gelu", functions=(F.gelu,), aten=("aten.gelu",),
        aten_args=("input", "approximate"),
        onnx=native("Erf / Tanh formula"),
        tfjs=native("Activation('gelu'); tanh: TorchActivation('gelu_tanh') (custom layer)"),
        tflite_flex=native("erf / tanh formula"),
        tflite_builtin=refused("approximate='none' needs erf, which has no builtin TFLite kernel (use the flex "
                               "variant or approximate='tanh'); approximate='tanh' is decomposed"),
        restrictions="approximate 'none' or 'tanh'",
        build_module=_build_gelu, build_function=_build_gelu_function, kinds=("gelu", "gelu_tanh"),
    ),
    LayerKind("relu", _keras_relu, _fwd(lambda x: tf.nn.relu(x)), _bwd_relu),
    LayerKind("sigmoid", _keras_activation, _fwd(lambda x: tf.math.sigmoid(x)), _bwd_sigmoid),
    LayerKind("tanh", _keras_activation, _fwd(lambda x: tf.math.tanh(x)), _bwd_tanh),
    LayerKind("gelu", _keras_activation, _fwd(_gelu), _bwd_gelu, builtin_refusal=_gelu_builtin),
    LayerKind("gelu_tanh", _keras_torch_activation, _fwd(_gelu_tanh), _bwd_gelu_tanh),
    LayerKind("relu6", _keras_activation, _fwd(lambda x: tf.nn.relu6(x)), _bwd_relu6),
    LayerKind("leaky_relu", _keras_leaky, _fwd_leaky, _bwd_leaky),
    LayerKind("silu", _keras_activation, _fwd(lambda x: x * tf.math.sigmoid(x)), _bwd_silu),
    LayerKind("hardswish", _keras_torch_activation, _fwd(lambda x: x * _hardsigmoid(x)), _bwd_hardswish),
    LayerKind("hardsigmoid", _keras_torch_activation, _fwd(_hardsigmoid), _bwd_hardsigmoid),
    LayerKind("softmax", _keras_softmax, _fwd(lambda x: tf.nn.softmax(x, axis=-1)), _bwd_softmax),
)
