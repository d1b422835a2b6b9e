"""Embeddings over integer token ids, and positional tables added to a sequence.

Positional forms: ``x + p`` for an ``nn.Parameter`` ``p`` of shape ``(T, D)`` / ``(1, T, D)``,
or ``x + emb(torch.arange(T))`` for an ``nn.Embedding`` with at least ``T`` rows (the readers
turn ``emb(arange(T))`` into a table value; :func:`build_positional` handles the add). Weights
keep torch's layout; the math is in :mod:`.._seqtf` and ``device_runtime/js/src/layers.js``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..._errors import ExportError
from ._registry import KerasContext, LayerKind, OpSpec, decomposed, native, register

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache

SERVER = "cut so that it runs on the server"


def _build_embedding(b: _Builder, node: _Node, m: Any, ids: Layer) -> None:
    if m.max_norm is not None or m.sparse:
        raise ExportError(f"{node.describe()}: Embedding with max_norm or sparse=True is not supported; {SERVER}")
    if m.padding_idx is not None:
        raise ExportError(
            f"{node.describe()}: Embedding with padding_idx is not supported (its row must not train); "
            f"construct it without padding_idx or {SERVER}"
        )
    if ids.attrs.get("dtype", "float32") == "float32" or len(ids.shape) != 1:
        raise ExportError(
            f"{node.describe()}: Embedding needs integer ids N x T as the segment input (partition with "
            f"--input-dtype int64, or {SERVER})"
        )
    lyr = b.add(node, "embedding", [ids], (ids.shape[0], int(m.embedding_dim)),
                num=int(m.num_embeddings), dim=int(m.embedding_dim))
    b.param(node, lyr, "embeddings", "weight")


def build_positional(b: _Builder, node: _Node) -> None:
    """``x + table`` where one operand is a positional table value (``("param", path)`` / ``("rows", path, n)``)."""
    other = node.kwargs.get("other", node.args[1] if len(node.args) > 1 else None)
    a, t = b.lookup(node.args[0]), b.lookup(other)
    if not (isinstance(a, tuple) and a[0] == "tensor"):
        a, t = t, a
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if not (isinstance(a, tuple) and a[0] == "tensor" and isinstance(t, tuple) and t[0] in ("param", "rows")) or \
            alpha != 1:
        raise ExportError(f"{node.describe()}: only a sequence plus a positional table is supported")
    x: Layer = a[1]
    path, rows = t[1], (t[2] if t[0] == "rows" else None)
    if path not in b.state:
        raise ExportError(f"{node.describe()}: {path!r} is not a parameter of the segment")
    w = b.state[path]
    if len(x.shape) != 2:
        raise ExportError(f"{node.describe()}: a parameter can only be added to an N x T x D sequence; {SERVER}")
    steps, dim = x.shape
    if rows is not None:
        ok = rows == steps and w.ndim == 2 and w.shape[1] == dim and w.shape[0] >= steps
    else:
        ok = tuple(w.shape) in ((steps, dim), (1, steps, dim))
    if not ok:
        raise ExportError(
            f"{node.describe()}: adding {path!r} of shape {tuple(w.shape)} to a sequence of shape (N, {steps}, {dim}) "
            "is not supported; only positional tables of shape (T, D) / (1, T, D) or Embedding(torch.arange(T))"
        )
    lyr = b.add(node, "positional", [x], x.shape)
    lyr.weights["embeddings"] = np.ascontiguousarray(w)
    lyr.torch_names["embeddings"] = path


def _keras_embedding(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    layer = ctx.L.Embedding(lyr.attrs["num"], lyr.attrs["dim"], name=lyr.name)
    out = layer(ins[0])
    ctx.set_weights(layer, [lyr.weights["embeddings"]])
    return out


def keras_seq(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    """A ``SplitexportLayer`` (TF.js: ``device_runtime/js/src/layers.js``) computing the layer's kind."""
    from .._seqtf import keras_layer

    layer = keras_layer(lyr.kind, lyr.name, lyr.weights, lyr.attrs)
    out = layer(ins[0])
    ctx.set_weights(layer, list(lyr.weights.values()))
    return out


def forward_seq(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    from .._seqtf import seq_forward

    return seq_forward(lyr.kind, ins[0], {k: seg.w(lyr, k) for k in lyr.weights}, lyr.attrs, mode == "train"), {}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    from .._seqtf import seq_backward

    gin, wg = seq_backward(lyr.kind, c.x[0], g, {k: seg.w(lyr, k) for k in lyr.weights})
    wgrads.update({f"{lyr.name}/{k}": v for k, v in wg.items()})
    return gin


register(
    OpSpec(
        "Embedding", "embedding", modules=("Embedding",),
        onnx=native("Gather"), tfjs=native("Embedding (int32 ids)"), tflite_flex=native("gather, GradientTape"),
        tflite_builtin=decomposed("gather; dW = one_hot(ids)^T @ g"),
        restrictions="integer ids N x T as the segment input (--input-dtype int64/int32); no padding_idx, "
                     "max_norm or sparse",
        build_module=_build_embedding, kinds=("embedding",),
    ),
    OpSpec(
        "positional table", "embedding", modules=("Parameter",),  # the table itself is never called
        onnx=native("Add of an initializer"), tfjs=native("SplitexportLayer 'positional' (layers.js)"),
        tflite_flex=native("add of table[:T], GradientTape"),
        tflite_builtin=decomposed("dW = sum over the batch, zero rows past T"),
        restrictions="x + nn.Parameter of shape (T, D) / (1, T, D), or x + Embedding(torch.arange(T)) (rows >= T)",
        fn="positional", build_function=build_positional, kinds=("positional",),
    ),
    LayerKind("embedding", _keras_embedding, forward_seq, _backward),
    LayerKind("positional", keras_seq, forward_seq, _backward),
)
