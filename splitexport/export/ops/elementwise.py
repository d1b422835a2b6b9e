"""Binary and n-ary tensor ops: add, mul (broadcasting), cat, and the reductions mean / sum."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache

NCHW_TO_NHWC_AXIS = {1: 3, 2: 1, 3: 2}
"""Torch axis of a rank-4 image tensor -> its axis in the NHWC layout used inside the graph."""


def _broadcast(node: _Node, x: Layer, y: Layer, sign: str) -> tuple[int, ...]:
    if len(x.shape) != len(y.shape) or any(p != q and 1 not in (p, q) for p, q in zip(x.shape, y.shape)):
        raise ExportError(f"{node.describe()}: a {sign} b is supported for two tensors of the same rank whose "
                          f"dims match or are 1 (got {list(x.shape)} and {list(y.shape)} without the batch)")
    return tuple(max(p, q) for p, q in zip(x.shape, y.shape))


def _build_add(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    other = kw.pop("other", args[1] if len(args) > 1 else None)
    alpha = kw.pop("alpha", args[2] if len(args) > 2 else 1)
    x, y = b.ref(args[0], node), b.ref(other, node)
    if alpha != 1:
        raise ExportError(f"{node.describe()}: add with alpha != 1 is not supported")
    b.add(node, "add", [x, y], _broadcast(node, x, y, "+"))


def _build_mul(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    other = kw.pop("other", args[1] if len(args) > 1 else None)
    from .._layergraph import _Ref

    if not isinstance(other, _Ref) or not isinstance(args[0], _Ref):
        raise ExportError(f"{node.describe()}: only the product of two tensors is supported (not a tensor and the "
                          f"constant {other!r}); fold the constant into the next layer's weights")
    x, y = b.ref(args[0], node), b.ref(other, node)
    b.add(node, "mul", [x, y], _broadcast(node, x, y, "*"))


def _internal_axes(node: _Node, x: Layer, dims: Any) -> list[int]:
    """Torch dims (without the batch's 0) of ``x`` as axes of the internal layout (NHWC for images)."""
    rank = len(x.shape) + 1
    dims = [dims] if isinstance(dims, int) else list(dims)
    out = []
    for d in dims:
        d = int(d) + rank if int(d) < 0 else int(d)
        if not 0 < d < rank:
            raise ExportError(f"{node.describe()}: reducing over the batch dimension is not supported")
        out.append(NCHW_TO_NHWC_AXIS[d] if rank == 4 else d)
    return sorted(out)


def _build_reduce(op: str) -> Any:
    def build(b: _Builder, node: _Node) -> None:
        args, kw = node.args, dict(node.kwargs)
        dims = kw.pop("dim", args[1] if len(args) > 1 else None)
        keep = bool(kw.pop("keepdim", args[2] if len(args) > 2 else False))
        if kw.pop("dtype", args[3] if len(args) > 3 else None) is not None or kw or dims is None:
            raise ExportError(f"{node.describe()}: only {op}(x, dim, keepdim) over explicit non-batch dims is supported")
        x = b.ref(args[0], node)
        axes = _internal_axes(node, x, dims)
        if len(x.shape) == 3 and not keep and 3 not in axes and axes != [1, 2]:
            raise ExportError(f"{node.describe()}: over an N x C x H x W tensor, {op} must keep the dims or reduce C "
                              "or both H and W")
        shape = [1 if i + 1 in axes else d for i, d in enumerate(x.shape)]
        if not keep:
            shape = [d for i, d in enumerate(shape) if i + 1 not in axes]
        b.add(node, op, [x], tuple(shape), axes=axes, keepdims=keep)

    return build


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


def _keras_mul(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Multiply(name=lyr.name)(ins)


def _keras_reduce(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    from .._keras_layers import TorchReduce

    return TorchReduce(lyr.kind, lyr.attrs["axes"], lyr.attrs["keepdims"], name=lyr.name)(ins[0])


def _fwd_mul(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return ins[0] * ins[1], {}


def _fwd_reduce(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    f = tf.reduce_mean if lyr.kind == "mean" else tf.reduce_sum
    return f(ins[0], lyr.attrs["axes"], keepdims=lyr.attrs["keepdims"]), {}


def unbroadcast(g: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``g`` (N, *out) over the axes where ``shape`` (without the batch) has a broadcast 1."""
    axes = [i + 1 for i, d in enumerate(shape) if d == 1 and int(g.shape[i + 1]) != 1]
    return tf.reduce_sum(g, axes, keepdims=True) if axes else g


def _bwd_add(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [unbroadcast(g, tuple(int(d) for d in x.shape[1:])) for x in c.x]


def _bwd_mul(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    a, b = c.x
    return [unbroadcast(g * b, tuple(int(d) for d in a.shape[1:])),
            unbroadcast(g * a, tuple(int(d) for d in b.shape[1:]))]


def _bwd_reduce(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    x, axes = c.x[0], lyr.attrs["axes"]
    if not lyr.attrs["keepdims"]:
        for ax in axes:
            g = tf.expand_dims(g, ax)
    if lyr.kind == "mean":
        g = g * (1.0 / float(np.prod([int(x.shape[a]) for a in axes])))
    return [tf.broadcast_to(g, tf.shape(x))]


def _keras_concat(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Concatenate(axis=lyr.attrs["axis"], name=lyr.name)(ins)


def _fwd_add(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return ins[0] + ins[1], {}


def _fwd_concat(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.concat(ins, axis=lyr.attrs["axis"]), {}


def _bwd_concat(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return list(tf.split(g, lyr.attrs["sizes"], axis=lyr.attrs["axis"]))


register(
    OpSpec(
        "add", "elementwise", fn="add", functions=(operator.add, torch.add), methods=("add",),
        aten=("aten.add",), aten_args=("input", "other", "alpha"),
        onnx=native("Add"), tfjs=native("Add"), tflite_flex=native("add"), tflite_builtin=native("add"),
        restrictions="two tensors of the same rank, dims equal or 1 (broadcast); alpha 1",
        build_function=_build_add, kinds=("add",),
    ),
    OpSpec(
        "mul", "elementwise", fn="mul", functions=(operator.mul, torch.mul), methods=("mul",),
        aten=("aten.mul",), aten_args=("input", "other"),
        onnx=native("Mul"), tfjs=native("Multiply"), tflite_flex=native("mul"),
        tflite_builtin=decomposed("products reduced over broadcast axes"),
        restrictions="two tensors of the same rank, dims equal or 1 (e.g. squeeze-excite); no constants",
        build_function=_build_mul, kinds=("mul",),
    ),
    OpSpec(
        "mean", "elementwise", fn="mean", functions=(torch.mean,), methods=("mean",),
        aten=("aten.mean",), aten_args=("input", "dim", "keepdim", "dtype"),
        onnx=native("ReduceMean"), tfjs=native("TorchReduce('mean') (custom layer)"),
        tflite_flex=native("reduce_mean"), tflite_builtin=decomposed("broadcast of g / count"),
        restrictions="explicit non-batch dims; on images keepdim, or reduce C, or both H and W",
        build_function=_build_reduce("mean"), kinds=("mean",),
    ),
    OpSpec(
        "sum", "elementwise", fn="sum", functions=(torch.sum,), methods=("sum",),
        aten=("aten.sum",), aten_args=("input", "dim", "keepdim", "dtype"),
        onnx=native("ReduceSum"), tfjs=native("TorchReduce('sum') (custom layer)"),
        tflite_flex=native("reduce_sum"), tflite_builtin=decomposed("broadcast of g"),
        restrictions="as mean",
        build_function=_build_reduce("sum"), kinds=("sum",),
    ),
    OpSpec(
        "cat", "elementwise", fn="cat", functions=(torch.cat, torch.concat), aten=("aten.cat", "aten.concat"),
        aten_args=("tensors", "dim"),
        onnx=native("Concat"), tfjs=native("Concatenate"), tflite_flex=native("concat"),
        tflite_builtin=decomposed("split of the gradient"),
        restrictions="same-rank tensors along a non-batch dim",
        build_function=_build_cat, kinds=("concat",),
    ),
    LayerKind("add", _keras_add, _fwd_add, _bwd_add),
    LayerKind("mul", _keras_mul, _fwd_mul, _bwd_mul),
    LayerKind("mean", _keras_reduce, _fwd_reduce, _bwd_reduce),
    LayerKind("sum", _keras_reduce, _fwd_reduce, _bwd_reduce),
    LayerKind("concat", _keras_concat, _fwd_concat, _bwd_concat),
)
