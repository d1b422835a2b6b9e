"""Binary and n-ary tensor ops: add, cat."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache

NCHW_TO_NHWC_AXIS = {1: 3, 2: 1, 3: 2}
"""Torch axis of a rank-4 image tensor -> its axis in the NHWC layout used inside the graph."""


def _build_add(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    other = kw.pop("other", args[1] if len(args) > 1 else None)
    alpha = kw.pop("alpha", args[2] if len(args) > 2 else 1)
    x, y = b.ref(args[0], node), b.ref(other, node)
    if alpha != 1 or x.shape != y.shape:
        raise ExportError(f"{node.describe()}: only a + b of two tensors with the same shape is supported")
    b.add(node, "add", [x, y], x.shape)


def _build_cat(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    tensors = args[0]
    dim = int(kw.pop("dim", args[1] if len(args) > 1 else 0))
    ins = [b.ref(t, node) for t in tensors]
    rank = len(ins[0].shape) + 1
    dim = dim + rank if dim < 0 else dim
    if dim == 0 or any(len(i.shape) + 1 != rank for i in ins):
        raise ExportError(f"{node.describe()}: only concatenation of same-rank tensors along a non-batch dim")
    axis = NCHW_TO_NHWC_AXIS[dim] if rank == 4 else dim
    shape = list(ins[0].shape)
    shape[axis - 1] = sum(i.shape[axis - 1] for i in ins)
    b.add(node, "concat", ins, tuple(shape), axis=axis, sizes=[i.shape[axis - 1] for i in ins])


def _keras_add(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Add(name=lyr.name)(ins)


def _keras_concat(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Concatenate(axis=lyr.attrs["axis"], name=lyr.name)(ins)


def _fwd_add(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return ins[0] + ins[1], {}


def _fwd_concat(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.concat(ins, axis=lyr.attrs["axis"]), {}


def _bwd_add(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [g, g]


def _bwd_concat(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return list(tf.split(g, lyr.attrs["sizes"], axis=lyr.attrs["axis"]))


register(
    OpSpec(
        "add", "elementwise", fn="add", functions=(operator.add, torch.add), methods=("add",),
        aten=("aten::add",), aten_args=("input", "other", "alpha"),
        onnx=native("Add"), tfjs=native("Add"), tflite_flex=native("add"), tflite_builtin=native("add"),
        restrictions="two tensors of the same shape, alpha 1",
        build_function=_build_add, kinds=("add",),
    ),
    OpSpec(
        "cat", "elementwise", fn="cat", functions=(torch.cat, torch.concat), aten=("aten::cat", "aten::concat"),
        aten_args=("tensors", "dim"),
        onnx=native("Concat"), tfjs=native("Concatenate"), tflite_flex=native("concat"),
        tflite_builtin=decomposed("split of the gradient"),
        restrictions="same-rank tensors along a non-batch dim",
        build_function=_build_cat, kinds=("concat",),
    ),
    LayerKind("add", _keras_add, _fwd_add, _bwd_add),
    LayerKind("concat", _keras_concat, _fwd_concat, _bwd_concat),
)
