"""Elementwise activations: ReLU, Sigmoid, Tanh, GELU."""

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


def _build_gelu(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    if m.approximate != "none":
        raise ExportError(f"{node.describe()}: approximate={m.approximate!r} is not supported (only 'none')")
    b.add(node, "gelu", [x], x.shape)


def _build_gelu_function(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    approx = kw.pop("approximate", args[1] if len(args) > 1 else "none")
    if approx != "none":
        raise ExportError(f"{node.describe()}: approximate={approx!r} is not supported (only 'none')")
    x = b.ref(args[0], node)
    b.add(node, "gelu", [x], x.shape)


def _keras_relu(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.ReLU(name=lyr.name)(ins[0])


def _keras_activation(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Activation(lyr.kind, name=lyr.name)(ins[0])


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


def _gelu_builtin(lyr: Layer) -> str | None:
    return "GELU needs erf, which has no builtin TFLite kernel"


register(
    OpSpec(
        "ReLU", "activation", modules=("ReLU",), fn="relu", functions=(torch.relu, F.relu), methods=("relu",),
        aten=("aten::relu",), aten_args=("input",),
        onnx=native("Relu"), tfjs=native("ReLU"), tflite_flex=native("relu"),
        tflite_builtin=decomposed("mask multiply"),
        build_module=unary("relu"), build_function=unary_function("relu"), kinds=("relu",),
    ),
    OpSpec(
        "Sigmoid", "activation", modules=("Sigmoid",), fn="sigmoid", functions=(torch.sigmoid,),
        methods=("sigmoid",), aten=("aten::sigmoid",), aten_args=("input",),
        onnx=native("Sigmoid"), tfjs=native("Activation('sigmoid')"), tflite_flex=native("sigmoid"),
        tflite_builtin=decomposed("y * (1 - y)"),
        build_module=unary("sigmoid"), build_function=unary_function("sigmoid"), kinds=("sigmoid",),
    ),
    OpSpec(
        "Tanh", "activation", modules=("Tanh",), fn="tanh", functions=(torch.tanh,), methods=("tanh",),
        aten=("aten::tanh",), aten_args=("input",),
        onnx=native("Tanh"), tfjs=native("Activation('tanh')"), tflite_flex=native("tanh"),
        tflite_builtin=decomposed("1 - y^2"),
        build_module=unary("tanh"), build_function=unary_function("tanh"), kinds=("tanh",),
    ),
    OpSpec(
        "GELU", "activation", modules=("GELU",), fn="gelu", functions=(F.gelu,), aten=("aten::gelu",),
        aten_args=("input", "approximate"),
        onnx=native("Erf-based formula (opset 17)"), tfjs=native("Activation('gelu')"), tflite_flex=native("erf"),
        tflite_builtin=refused("GELU needs erf, which has no builtin TFLite kernel; use the flex variant"),
        restrictions="approximate='none'",
        build_module=_build_gelu, build_function=_build_gelu_function, kinds=("gelu",),
    ),
    LayerKind("relu", _keras_relu, _fwd(lambda x: tf.nn.relu(x)), _bwd_relu),
    LayerKind("sigmoid", _keras_activation, _fwd(lambda x: tf.math.sigmoid(x)), _bwd_sigmoid),
    LayerKind("tanh", _keras_activation, _fwd(lambda x: tf.math.tanh(x)), _bwd_tanh),
    LayerKind("gelu", _keras_activation, _fwd(_gelu), _bwd_gelu, builtin_refusal=_gelu_builtin),
)
