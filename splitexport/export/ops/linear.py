"""Linear layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def _build_linear(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    if len(x.shape) != 1:
        raise ExportError(f"{node.describe()}: Linear is supported on N x F inputs only (flatten first)")
    lyr = b.add(node, "linear", [x], (int(m.out_features),))
    b.param(node, lyr, "kernel", "weight")
    if m.bias is not None:
        b.param(node, lyr, "bias", "bias")


def _keras(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    layer = ctx.L.Dense(lyr.shape[-1], use_bias="bias" in lyr.weights, name=lyr.name)
    out = layer(ins[0])
    ctx.set_weights(layer, [lyr.weights[k] for k in ("kernel", "bias") if k in lyr.weights])
    return out


def _forward(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    y = tf.matmul(ins[0], seg.w(lyr, "kernel"))
    if "bias" in lyr.weights:
        y = y + seg.w(lyr, "bias")
    return y, {}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x = c.x[0]
    wgrads[f"{lyr.name}/kernel"] = tf.matmul(x, g, transpose_a=True)
    if "bias" in lyr.weights:
        wgrads[f"{lyr.name}/bias"] = tf.reduce_sum(g, 0)
    return [tf.matmul(g, seg.w(lyr, "kernel"), transpose_b=True)]


def _layout(lyr: Layer, key: str) -> str:
    return "linear" if key == "kernel" else "identity"


register(
    OpSpec(
        "Linear", "linear", modules=("Linear",),
        onnx=native("Gemm / MatMul"), tfjs=native("Dense"), tflite_flex=native("matmul"),
        tflite_builtin=decomposed("matmul backward"),
        restrictions="N x F input",
        build_module=_build_linear, kinds=("linear",),
    ),
    LayerKind("linear", _keras, _forward, _backward, layout=_layout),
)
