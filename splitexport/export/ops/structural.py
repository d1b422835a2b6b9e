"""Values that are no tensors: ``x.shape`` / ``x.size(d)``, ``torch.arange(T)``, and items of tuple outputs.

They compute nothing on the device: sizes are constants of the exported segment,
``torch.arange(T)`` feeds an ``nn.Embedding`` as positions (see :mod:`.embedding`), and
``rnn(x)[0]`` / ``attn(x, x, x)[0]`` select a layer's output (other items are refused when used).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch

from ..._errors import ExportError
from ._registry import OpSpec, native, register

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node

_CONST = native("(a constant of the exported segment)")


def _torch_shape(lyr: Layer) -> tuple[int, ...]:
    s = lyr.shape
    return (s[2], s[0], s[1]) if len(s) == 3 else s


def _arg(node: _Node, i: int, name: str, default: Any = None) -> Any:
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


def _build_size(b: _Builder, node: _Node) -> None:
    src = b.value(node.args[0])
    if src[0] != "tensor":
        raise ExportError(f"{node.describe()}: size of a non-tensor value is not supported")
    shape = (None, *_torch_shape(src[1]))
    attr = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], str) else None
    if attr in ("device", "dtype"):  # getattr(x, "device") feeding torch.arange
        b.values[node.name] = ("meta", attr)
    elif attr is not None and attr != "shape":
        raise ExportError(f"{node.describe()}: attribute {attr!r} of a tensor is not supported")
    else:
        dim = None if attr else _arg(node, 1, "dim")
        b.values[node.name] = ("shape", shape) if dim is None else ("int", shape[int(dim)])


def _build_getitem(b: _Builder, node: _Node) -> None:
    src = b.value(node.args[0])
    index = b.value(_arg(node, 1, "index"))
    if src[0] == "invalid":
        b.invalid[node.name] = src[1]
    elif src[0] == "shape" and isinstance(index, int):
        if src[1][index] is None:
            raise ExportError(f"{node.describe()}: the batch size is not a constant of the exported segment")
        b.values[node.name] = ("int", src[1][index])
    elif src[0] == "tuple" and isinstance(index, int):
        if index == 0:
            b.alias[node.name] = src[1]
        else:
            b.invalid[node.name] = src[2]
    else:
        raise ExportError(f"{node.describe()}: indexing a tensor is not supported by the TF.js / TFLite export "
                          "(only the output item of an RNN / attention tuple)")


def _build_arange(b: _Builder, node: _Node) -> None:
    end = b.value(node.args[0]) if node.args else None
    if isinstance(end, tuple) and end[0] == "int":
        end = end[1]
    dtype = node.kwargs.get("dtype")
    if not isinstance(end, int) or len(node.args) > 1 or dtype not in (None, torch.int64, torch.int32):
        raise ExportError(f"{node.describe()}: only torch.arange(T) feeding an Embedding (positions) is supported")
    b.values[node.name] = ("arange", end)


register(
    OpSpec(
        "size", "structural", fn="size", functions=(getattr,), methods=("size",),
        aten=("aten::size",), aten_args=("input", "dim"),
        onnx=_CONST, tfjs=_CONST, tflite_flex=_CONST, tflite_builtin=_CONST,
        restrictions="x.shape / x.size(d) of a non-batch dim (feeding torch.arange)",
        build_function=_build_size,
    ),
    OpSpec(
        "getitem", "structural", fn="getitem", functions=(operator.getitem,),
        aten=("aten::__getitem__", "prim::TupleIndex"), aten_args=("input", "index"),
        onnx=_CONST, tfjs=_CONST, tflite_flex=_CONST, tflite_builtin=_CONST,
        restrictions="item 0 of an RNN / attention output tuple; an item of a shape",
        build_function=_build_getitem,
    ),
    OpSpec(
        "arange", "structural", fn="arange", functions=(torch.arange,), aten=("aten::arange",), aten_args=("input",),
        onnx=_CONST, tfjs=_CONST, tflite_flex=_CONST, tflite_builtin=_CONST,
        restrictions="torch.arange(T) feeding an Embedding (positional rows)",
        build_function=_build_arange,
    ),
)
