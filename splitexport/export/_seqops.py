"""Sequence layers in the layer graph: Embedding, positional embeddings, GRU, LSTM, attention, encoder layers.

Each torch form maps to one :class:`~._layergraph.Layer` whose weights keep torch's layout
(``identity`` transform), named after the torch parameters relative to the module with dots
as underscores (``self_attn_in_proj_weight``). The math lives in :mod:`._seqtf` (TensorFlow:
Keras layers and TFLite graphs) and ``device_runtime/js/src/layers.js`` (TF.js).

Kinds and their torch forms:

* ``embedding``: ``nn.Embedding`` over int ids ``(N, T)`` -> ``(N, T, D)``;
* ``positional``: ``x + p`` for an ``nn.Parameter`` ``p`` of shape ``(T, D)`` / ``(1, T, D)``, or
  ``x + emb(torch.arange(T))`` for an ``nn.Embedding`` ``emb`` (any number of rows >= T);
* ``gru`` / ``lstm``: single-layer, unidirectional, ``batch_first`` ``nn.GRU`` / ``nn.LSTM`` from a
  zero state; only ``output`` (``rnn(x)[0]``) may be used;
* ``attention``: ``nn.MultiheadAttention(batch_first=True)`` as self-attention ``attn(x, x, x)[0]``;
* ``encoder``: ``nn.TransformerEncoderLayer(batch_first=True)``, relu or gelu, ``norm_first`` either.

Dropout inside attention / encoder layers must be 0 (their masks are not reproducible);
masks are refused. None of these but ``embedding`` and ``positional`` has a builtin-ops TFLite
backward pass (see :data:`BUILTIN_REASONS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import ExportError

if TYPE_CHECKING:
    from ._layergraph import Layer, _Builder, _Node

__all__ = ["BUILTIN_REASONS", "SEQ_KINDS", "SEQ_MODULES", "SUPPORTED", "seq_module"]

SEQ_MODULES = ("Embedding", "GRU", "LSTM", "MultiheadAttention", "TransformerEncoderLayer")
SEQ_KINDS = ("embedding", "positional", "gru", "lstm", "attention", "encoder")
SUPPORTED = (
    "Embedding over int ids (no max_norm, no sparse gradients)",
    "positional embedding: x + nn.Parameter, or x + Embedding(torch.arange(T))",
    "GRU / LSTM (one layer, unidirectional, batch_first, zero initial state, output only)",
    "MultiheadAttention (batch_first self-attention, no masks, dropout 0)",
    "TransformerEncoderLayer (batch_first, relu or gelu, norm_first either, no masks, dropout 0)",
)
BUILTIN_REASONS = {
    "gru": "the GRU backward pass through time has no builtin-ops implementation",
    "lstm": "the LSTM backward pass through time has no builtin-ops implementation",
    "attention": "the attention backward pass has no builtin-ops implementation",
    "encoder": "the transformer encoder layer's backward pass has no builtin-ops implementation",
}
"""Kinds the builtin-ops TFLite variant refuses, with the reason."""

_SERVER = "cut so that it runs on the server"


def _tensor_args(b: _Builder, node: _Node, count: int) -> list[Layer]:
    """The first ``count`` arguments as layers; every further argument must be a default (None / bool)."""
    args = list(node.args)
    for key, value in node.kwargs.items():
        if value is not None and not isinstance(value, bool):
            raise ExportError(f"{node.describe()}: argument {key}={value!r} is not supported (masks / states); {_SERVER}")
    for value in args[count:]:
        if value is not None and not isinstance(value, bool):
            raise ExportError(f"{node.describe()}: extra argument {value!r} is not supported (masks / states); {_SERVER}")
    if len(args) < count:
        raise ExportError(f"{node.describe()}: called with {len(args)} tensors, {count} expected")
    return [b.ref(a, node) for a in args[:count]]


def _check_seq(node: _Node, x: Layer, what: str) -> tuple[int, int]:
    if len(x.shape) != 2 or x.attrs.get("dtype", "float32") != "float32":
        raise ExportError(f"{node.describe()}: {what} expects a float N x T x F input, got per-sample shape {x.shape}")
    return int(x.shape[0]), int(x.shape[1])


def _no_dropout(node: _Node, p: float, what: str) -> None:
    if p:
        raise ExportError(
            f"{node.describe()}: {what} dropout={p} is not supported on the device (its masks cannot match the "
            f"server's); construct it with dropout=0.0 or {_SERVER}"
        )


def seq_module(b: _Builder, node: _Node, m: Any, mtype: str) -> None:
    """Add the layer of a sequence module call (``mtype`` in :data:`SEQ_MODULES`)."""
    if mtype == "Embedding":
        (ids,) = _tensor_args(b, node, 1)
        if m.max_norm is not None or m.sparse:
            raise ExportError(f"{node.describe()}: Embedding with max_norm or sparse=True is not supported; {_SERVER}")
        if m.padding_idx is not None:
            raise ExportError(
                f"{node.describe()}: Embedding with padding_idx is not supported (its row must not train); "
                f"construct it without padding_idx or {_SERVER}"
            )
        if ids.attrs.get("dtype", "float32") == "float32" or len(ids.shape) != 1:
            raise ExportError(
                f"{node.describe()}: Embedding needs integer ids N x T as the segment input "
                "(partition with --input-dtype int64)"
            )
        lyr = b.add(node, "embedding", [ids], (ids.shape[0], int(m.embedding_dim)),
                    num=int(m.num_embeddings), dim=int(m.embedding_dim))
        b.param(node, lyr, "embeddings", "weight")
    elif mtype in ("GRU", "LSTM"):
        (x,) = _tensor_args(b, node, 1)
        t, _ = _check_seq(node, x, mtype)
        if int(m.num_layers) != 1 or bool(m.bidirectional) or not bool(m.batch_first) or int(m.proj_size or 0):
            raise ExportError(
                f"{node.describe()}: only single-layer, unidirectional {mtype} with batch_first=True (no proj_size) is "
                f"supported; stack single-layer {mtype}s or {_SERVER}"
            )
        lyr = b.add(node, mtype.lower(), [x], (t, int(m.hidden_size)), hidden=int(m.hidden_size))
        for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            if key.startswith("weight") or bool(m.bias):
                b.param(node, lyr, key, f"{key}_l0")
        b.tuple_output(node, lyr, f"{mtype} returns (output, h_n); use output (e.g. output[:, -1]), not h_n")
    elif mtype == "MultiheadAttention":
        q, k, v = _tensor_args(b, node, 3)
        if not (q.name == k.name == v.name):
            raise ExportError(f"{node.describe()}: only self-attention attn(x, x, x) is supported; {_SERVER}")
        _check_seq(node, q, mtype)
        lyr = b.add(node, "attention", [q], q.shape, heads=_attention_checks(node, m, mtype))
        _attention_params(b, node, lyr, m, "")
        b.tuple_output(node, lyr, "MultiheadAttention returns (output, weights); only output is supported")
    elif mtype == "TransformerEncoderLayer":
        (x,) = _tensor_args(b, node, 1)
        _check_seq(node, x, mtype)
        act = {1: "relu", 2: "gelu"}.get(int(m.activation_relu_or_gelu))
        if act is None:
            raise ExportError(f"{node.describe()}: only activation 'relu' or 'gelu' is supported; {_SERVER}")
        for sub in ("dropout", "dropout1", "dropout2"):
            _no_dropout(node, float(getattr(m, sub).p), mtype)
        eps = float(m.norm1.eps)
        if float(m.norm2.eps) != eps or not m.norm1.elementwise_affine or not m.norm2.elementwise_affine:
            raise ExportError(f"{node.describe()}: the two LayerNorms must be affine with the same eps; {_SERVER}")
        heads = _attention_checks(node, m.self_attn, mtype)
        lyr = b.add(node, "encoder", [x], x.shape, heads=heads, activation=act, norm_first=bool(m.norm_first),
                    epsilon=eps)
        _attention_params(b, node, lyr, m.self_attn, "self_attn.")
        for sub in ("linear1", "linear2", "norm1", "norm2"):
            for p in ("weight", "bias"):
                if getattr(getattr(m, sub), p, None) is not None:
                    b.param(node, lyr, f"{sub}_{p}", f"{sub}.{p}")
    else:  # pragma: no cover - callers check SEQ_MODULES
        raise ExportError(f"{node.describe()} has no sequence mapping")


def _attention_checks(node: _Node, m: Any, what: str) -> int:
    if not bool(m.batch_first) or not bool(m._qkv_same_embed_dim) or m.bias_k is not None or bool(m.add_zero_attn):
        raise ExportError(
            f"{node.describe()}: only batch_first attention with equal q/k/v sizes, no bias_k/bias_v and no "
            f"add_zero_attn is supported; {_SERVER}"
        )
    _no_dropout(node, float(m.dropout), f"{what} attention")
    return int(m.num_heads)


def _attention_params(b: _Builder, node: _Node, lyr: Layer, m: Any, prefix: str) -> None:
    key = prefix.replace(".", "_")
    b.param(node, lyr, f"{key}in_proj_weight", f"{prefix}in_proj_weight")
    if m.in_proj_bias is not None:
        b.param(node, lyr, f"{key}in_proj_bias", f"{prefix}in_proj_bias")
    b.param(node, lyr, f"{key}out_proj_weight", f"{prefix}out_proj.weight")
    if m.out_proj.bias is not None:
        b.param(node, lyr, f"{key}out_proj_bias", f"{prefix}out_proj.bias")
