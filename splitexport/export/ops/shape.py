"""Shape ops: Flatten, Identity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def flatten(b: _Builder, node: _Node, x: Layer, start: int, end: int) -> None:
    if start != 1 or end != -1:
        raise ExportError(f"{node.describe()}: only flatten(start_dim=1, end_dim=-1) is supported")
    if len(x.shape) == 1:
        b.same(node, x)
        return
    b.add(node, "flatten", [x], (int(np.prod(x.shape)),))


def _build_flatten(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    flatten(b, node, x, int(m.start_dim), int(m.end_dim))


def _build_flatten_function(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    start = kw.pop("start_dim", args[1] if len(args) > 1 else 0)
    end = kw.pop("end_dim", args[2] if len(args) > 2 else -1)
    flatten(b, node, b.ref(args[0], node), int(start), int(end))


def _build_identity(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    b.same(node, x)


def _keras(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    h = ctx.L.Permute((3, 1, 2), name=f"{lyr.name}_to_nchw")(ins[0])
    return ctx.L.Flatten(name=lyr.name)(h)


def _forward(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.reshape(tf.transpose(ins[0], [0, 3, 1, 2]), [-1, lyr.shape[0]]), {}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    n, h, w, ch = (int(d) for d in c.x[0].shape)
    return [tf.transpose(tf.reshape(g, [n, ch, h, w]), [0, 2, 3, 1])]


register(
    OpSpec(
        "Flatten", "shape", modules=("Flatten",), fn="flatten", functions=(torch.flatten,), methods=("flatten",),
        aten=("aten::flatten",), aten_args=("input", "start_dim", "end_dim"),
        onnx=native("Flatten / Reshape"), tfjs=native("Permute to C,H,W + Flatten"),
        tflite_flex=native("transpose + reshape"), tflite_builtin=decomposed("reshape + transpose back"),
        restrictions="start_dim=1, end_dim=-1 (torch's C,H,W order is kept)",
        build_module=_build_flatten, build_function=_build_flatten_function, kinds=("flatten",),
    ),
    OpSpec(
        "Identity", "shape", modules=("Identity",),
        onnx=native("(removed)"), tfjs=native("(removed)"), tflite_flex=native("(removed)"),
        tflite_builtin=native("(removed)"),
        build_module=_build_identity,
    ),
    LayerKind("flatten", _keras, _forward, _backward),
)
