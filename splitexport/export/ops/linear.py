"""Linear layers and matmul."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def _build_linear(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    if len(x.shape) not in (1, 2):
        raise ExportError(f"{node.describe()}: Linear is supported on N x F and N x T x F inputs only (flatten first)")
    lyr = b.add(node, "linear", [x], (*x.shape[:-1], int(m.out_features)))
    b.param(node, lyr, "kernel", "weight")
    if m.bias is not None:
        b.param(node, lyr, "bias", "bias")


def _keras(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    layer = ctx.L.Dense(lyr.shape[-1], use_bias="bias" in lyr.weights, name=lyr.name)
    out = layer(ins[0])
    ctx.set_weights(layer, [lyr.weights[k] for k in ("kernel", "bias") if k in lyr.weights])
    return out


def _flat(x: Any) -> Any:
    """N x T x F as (N*T) x F (Linear acts on the last axis)."""
    return tf.reshape(x, [-1, int(x.shape[-1])]) if len(x.shape) == 3 else x


def _forward(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    x = ins[0]
    y = tf.matmul(_flat(x), seg.w(lyr, "kernel"))
    if len(x.shape) == 3:
        y = tf.reshape(y, [-1, int(x.shape[1]), lyr.shape[-1]])
    if "bias" in lyr.weights:
        y = y + seg.w(lyr, "bias")
    return y, {}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x, g2 = _flat(c.x[0]), _flat(g)
    wgrads[f"{lyr.name}/kernel"] = tf.matmul(x, g2, transpose_a=True)
    if "bias" in lyr.weights:
        wgrads[f"{lyr.name}/bias"] = tf.reduce_sum(g2, 0)
    return [tf.reshape(tf.matmul(g2, seg.w(lyr, "kernel"), transpose_b=True), tf.shape(c.x[0]))]


def _build_matmul(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    x, y = b.ref(args[0], node), b.ref(kw.pop("other", args[1] if len(args) > 1 else None), node)
    if len(x.shape) != 2 or len(y.shape) != 2 or x.shape[1] != y.shape[0]:
        raise ExportError(f"{node.describe()}: matmul is supported for two N x T x F / N x F x S tensors "
                          f"(got {list(x.shape)} and {list(y.shape)} per sample)")
    b.add(node, "matmul", [x, y], (x.shape[0], y.shape[1]))


def _keras_matmul(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Dot(axes=(2, 1), name=lyr.name)(ins)


def _fwd_matmul(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.matmul(ins[0], ins[1]), {}


def _bwd_matmul(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    a, b = c.x
    return [tf.matmul(g, b, transpose_b=True), tf.matmul(a, g, transpose_a=True)]


def _layout(lyr: Layer, key: str) -> str:
    return "linear" if key == "kernel" else "identity"


register(
    OpSpec(
        "Linear", "linear", modules=("Linear",),
        onnx=native("Gemm / MatMul"), tfjs=native("Dense"), tflite_flex=native("matmul"),
        tflite_builtin=decomposed("matmul backward"),
        restrictions="N x F or N x T x F input",
        build_module=_build_linear, kinds=("linear",),
    ),
    OpSpec(
        "matmul", "linear", fn="matmul", functions=(torch.matmul, torch.bmm, operator.matmul), methods=("matmul",),
        aten=("aten.matmul", "aten.bmm"), aten_args=("input", "other"),
        onnx=native("MatMul"), tfjs=native("Dot(axes=(2, 1))"), tflite_flex=native("batch_matmul"),
        tflite_builtin=decomposed("batch_matmul with transposes"),
        restrictions="two batched 3-D tensors (N x T x F @ N x F x S)",
        build_function=_build_matmul, kinds=("matmul",),
    ),
    LayerKind("linear", _keras, _forward, _backward, layout=_layout),
    LayerKind("matmul", _keras_matmul, _fwd_matmul, _bwd_matmul),
)
