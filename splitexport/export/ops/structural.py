"""Values that are no tensors: ``x.shape``, ``torch.arange(T)``, and items of tuple outputs (``x.size(d)``: ops.shape).

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
from .shape import Size

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node

_CONST = native("(a constant of the exported segment)")


def _torch_shape(lyr: Layer) -> tuple[int, ...]:
    s = lyr.shape
    return (s[2], s[0], s[1]) if len(s) == 3 else s


def _tag(v: Any) -> Any:
    """The kind of a :meth:`_Builder.lookup` result (``"tensor"``, ``"shape"``, ``"tuple"``, ...), else None."""
    return v[0] if isinstance(v, tuple) and v and isinstance(v[0], str) else None


def _arg(node: _Node, i: int, name: str, default: Any = None) -> Any:
    return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)


def _build_getattr(b: _Builder, node: _Node) -> None:
    src = b.lookup(node.args[0])
    attr = node.args[1] if len(node.args) > 1 else None
    if _tag(src) != "tensor" or attr not in ("shape", "device", "dtype"):
        raise ExportError(f"{node.describe()}: only x.shape, x.device and x.dtype of a tensor are supported")
    # x.device / x.dtype only feed torch.arange
    b.values[node.name] = ("shape", (None, *_torch_shape(src[1]))) if attr == "shape" else ("meta", attr)


def _build_getitem(b: _Builder, node: _Node) -> None:
    src = b.lookup(node.args[0])
    index = b.lookup(_arg(node, 1, "index"))
    if _tag(src) == "invalid":
        b.invalid[node.name] = src[1]
    elif _tag(src) == "shape" and isinstance(index, int):
        d = index + len(src[1]) if index < 0 else index
        b.values[node.name] = Size(d, src[1][d])  # as x.size(d)
    elif _tag(src) == "tuple" and isinstance(index, int):
        if index == 0:
            b.alias[node.name] = src[1]
        else:
            b.invalid[node.name] = src[2]
    else:
        raise ExportError(f"{node.describe()}: indexing a tensor is not supported by the TF.js / TFLite export "
                          "(only the output item of an RNN / attention tuple)")


def _build_arange(b: _Builder, node: _Node) -> None:
    end = b.lookup(node.args[0]) if node.args else None
    end = end.value if isinstance(end, Size) else end  # x.size(1) / x.shape[1]
    dtype = node.kwargs.get("dtype")
    if not isinstance(end, int) or len(node.args) > 1 or dtype not in (None, torch.int64, torch.int32):
        raise ExportError(f"{node.describe()}: only torch.arange(T) feeding an Embedding (positions) is supported")
    b.values[node.name] = ("arange", end)


register(
    OpSpec(
        "shape attribute", "structural", fn="getattr", functions=(getattr,),
        onnx=_CONST, tfjs=_CONST, tflite_flex=_CONST, tflite_builtin=_CONST,
        restrictions="x.shape[d] of a non-batch dim, x.device / x.dtype (feeding torch.arange)",
        build_function=_build_getattr,
    ),
    OpSpec(
        "getitem", "structural", fn="getitem", functions=(operator.getitem,),
        onnx=_CONST, tfjs=_CONST, tflite_flex=_CONST, tflite_builtin=_CONST,
        restrictions="item 0 of an RNN / attention output tuple; an item of a shape",
        build_function=_build_getitem,
    ),
    OpSpec(
        "arange", "structural", fn="arange", functions=(torch.arange,), aten=("aten.arange.default",), aten_args=("input",),
        onnx=_CONST, tfjs=_CONST, tflite_flex=_CONST, tflite_builtin=_CONST,
        restrictions="torch.arange(T) feeding an Embedding (positional rows)",
        build_function=_build_arange,
    ),
)
