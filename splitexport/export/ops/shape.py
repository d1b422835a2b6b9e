"""Shape ops: Flatten, Identity, size, view / reshape, permute, transpose."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Size:
    """The result of ``x.size(dim)``: ``dim`` 0 is the batch (symbolic), any other a known int."""

    dim: int
    value: int | None


def _build_size(b: _Builder, node: _Node) -> None:
    args, kw = node.args, dict(node.kwargs)
    dim = kw.pop("dim", args[1] if len(args) > 1 else None)
    x = b.ref(args[0], node)
    torch_shape = _torch_shape(x)
    if dim is None:  # x.size() is x.shape (ops.structural)
        b.values[node.name] = ("shape", (None, *torch_shape))
        return
    if not isinstance(dim, int):
        raise ExportError(f"{node.describe()}: only x.size() and x.size(dim) with an int dim are supported")
    d = int(dim) + len(torch_shape) + 1 if int(dim) < 0 else int(dim)
    b.values[node.name] = Size(d, None if d == 0 else torch_shape[d - 1])


def _torch_shape(x: Layer) -> tuple[int, ...]:
    """Per-sample torch shape of a layer's output (images are NHWC inside)."""
    return (x.shape[2], x.shape[0], x.shape[1]) if len(x.shape) == 3 else x.shape


def _to_torch_layout(b: _Builder, node: _Node, x: Layer) -> Layer:
    if len(x.shape) != 3:
        return x
    return b.add(node, "permute", [x], _torch_shape(x), suffix="_to_nchw", dims=(3, 1, 2))


def _from_torch_layout(b: _Builder, node: _Node, x: Layer, kind: str, shape: tuple[int, ...], **attrs: Any) -> None:
    """Add the node's layer (``kind`` on a torch-layout tensor, giving torch ``shape``), back to NHWC if rank 4."""
    if len(shape) != 3:
        b.add(node, kind, [x], shape, **attrs)
        return
    y = b.add(node, kind, [x], shape, suffix="_nchw", **attrs)
    b.add(node, "permute", [y], (shape[1], shape[2], shape[0]), dims=(2, 3, 1))


def _build_view(b: _Builder, node: _Node) -> None:
    args = list(node.args)
    kw = dict(node.kwargs)
    x = b.ref(args[0], node)
    sizes = b.value(kw.pop("shape", kw.pop("size", args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else ()))))
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    if not sizes or not (sizes[0] == -1 or (isinstance(sizes[0], Size) and sizes[0].dim == 0)):
        raise ExportError(f"{node.describe()}: view/reshape must keep the batch as the first dim (x.size(0) or -1)")
    rest: list[int] = []
    for s in sizes[1:]:
        v = s.value if isinstance(s, Size) else s
        if not isinstance(v, int):
            raise ExportError(f"{node.describe()}: view/reshape sizes must be constants or x.size(dim)")
        rest.append(v)
    numel = int(np.prod(x.shape))
    if sizes[0] == -1 and -1 in rest:
        raise ExportError(f"{node.describe()}: view/reshape with -1 for the batch needs every other size")
    if -1 in rest:
        known = int(np.prod([s for s in rest if s != -1]))
        rest = [numel // known if s == -1 else s for s in rest]
    if int(np.prod(rest)) != numel or not 1 <= len(rest) <= 3:
        raise ExportError(f"{node.describe()}: cannot view {list(_torch_shape(x))} (per sample) as {rest}")
    h = _to_torch_layout(b, node, x)
    shape = tuple(int(s) for s in rest)
    if shape == h.shape and h is x:
        b.same(node, x)
        return
    _from_torch_layout(b, node, h, "reshape", shape, target=shape)


def _build_permute(b: _Builder, node: _Node) -> None:
    args = list(node.args)
    kw = dict(node.kwargs)
    x = b.ref(args[0], node)
    rank = len(x.shape) + 1
    if node.op == "transpose":
        d0 = kw.pop("dim0", args[1] if len(args) > 1 else None)
        d1 = kw.pop("dim1", args[2] if len(args) > 2 else None)
        perm = list(range(rank))
        a0, a1 = (int(d) + rank if int(d) < 0 else int(d) for d in (d0, d1))  # type: ignore[arg-type]
        perm[a0], perm[a1] = perm[a1], perm[a0]
    else:
        dims = kw.pop("dims", args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else ()))
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        perm = [int(d) + rank if int(d) < 0 else int(d) for d in dims]
    if sorted(perm) != list(range(rank)) or perm[0] != 0:
        raise ExportError(f"{node.describe()}: only permutations that keep the batch dim first are supported")
    h = _to_torch_layout(b, node, x)
    tshape = h.shape
    shape = tuple(tshape[p - 1] for p in perm[1:])
    _from_torch_layout(b, node, h, "permute", shape, dims=tuple(perm[1:]))


def _keras_reshape(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Reshape(lyr.attrs["target"], name=lyr.name)(ins[0])


def _keras_permute(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Permute(lyr.attrs["dims"], name=lyr.name)(ins[0])


def _fwd_reshape(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.reshape(ins[0], [-1, *lyr.attrs["target"]]), {}


def _bwd_reshape(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [tf.reshape(g, tf.shape(c.x[0]))]


def _fwd_permute(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    return tf.transpose(ins[0], [0, *lyr.attrs["dims"]]), {}


def _bwd_permute(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    perm = [0, *lyr.attrs["dims"]]
    return [tf.transpose(g, [perm.index(i) for i in range(len(perm))])]


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
        aten=("aten.flatten",), aten_args=("input", "start_dim", "end_dim"),
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
    OpSpec(
        "size", "shape", fn="size", methods=("size",), aten=("aten.size",), aten_args=("input", "dim"),
        onnx=native("Shape + Gather"), tfjs=native("(folded into view/reshape)"),
        tflite_flex=native("(folded)"), tflite_builtin=native("(folded)"),
        restrictions="x.size(dim) feeding a view/reshape; x.size() as x.shape",
        build_function=_build_size,
    ),
    OpSpec(
        "view / reshape", "shape", fn="view", functions=(torch.reshape,), methods=("view", "reshape"),
        aten=("aten.view", "aten.reshape"), aten_args=("input", "shape"),
        onnx=native("Reshape"), tfjs=native("Reshape (Permute to NCHW first for images)"),
        tflite_flex=native("reshape"), tflite_builtin=native("reshape"),
        restrictions="batch kept first (x.size(0) or -1); result rank 2 to 4",
        build_function=_build_view, kinds=("reshape", "permute"),
    ),
    OpSpec(
        "permute", "shape", fn="permute", functions=(torch.permute,), methods=("permute",),
        aten=("aten.permute",), aten_args=("input", "dims"),
        onnx=native("Transpose"), tfjs=native("Permute"), tflite_flex=native("transpose"),
        tflite_builtin=native("inverse transpose"),
        restrictions="batch dim stays first",
        build_function=_build_permute, kinds=("permute",),
    ),
    OpSpec(
        "transpose", "shape", fn="transpose", functions=(torch.transpose,), methods=("transpose",),
        aten=("aten.transpose",), aten_args=("input", "dim0", "dim1"),
        onnx=native("Transpose"), tfjs=native("Permute"), tflite_flex=native("transpose"),
        tflite_builtin=native("inverse transpose"),
        restrictions="batch dim stays first",
        build_function=_build_permute, kinds=("permute",),
    ),
    LayerKind("flatten", _keras, _forward, _backward),
    LayerKind("reshape", _keras_reshape, _fwd_reshape, _bwd_reshape),
    LayerKind("permute", _keras_permute, _fwd_permute, _bwd_permute),
)
