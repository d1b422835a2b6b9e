"""TensorFlow math of the sequence layers (one definition for the Keras layers and the TFLite graphs).

Every function takes batch-first tensors and the layer's weights in torch layout (``weight_ih``
is ``(gates * H, F)`` as in ``nn.GRU``), so the weights round-trip to torch unchanged. The
JavaScript twins in ``device_runtime/js/src/layers.js`` compute the same thing op for op.
Only imported when exporting (imports TensorFlow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from .ops._tfshared import site_dropout

__all__ = ["add_positional", "attention", "encoder_layer", "gru", "keras_layer", "layer_norm", "linear", "lstm",
           "seq_backward", "seq_forward"]


def linear(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor | None) -> tf.Tensor:
    """``x @ w.T + b`` on the last axis of a rank-2 or rank-3 ``x`` (torch's ``nn.Linear`` layout)."""
    shape = x.shape
    if len(shape) == 2:
        y = tf.matmul(x, w, transpose_b=True)
    else:
        y = tf.reshape(tf.matmul(tf.reshape(x, [-1, int(shape[-1])]), w, transpose_b=True),
                       [-1, *[int(d) for d in shape[1:-1]], int(w.shape[0])])
    return y + b if b is not None else y


def layer_norm(x: tf.Tensor, gamma: tf.Tensor | None, beta: tf.Tensor | None, eps: float) -> tf.Tensor:
    """``nn.LayerNorm`` over the last axis (biased variance, like torch)."""
    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = tf.reduce_mean(xc * xc, axis=-1, keepdims=True)
    y = xc * tf.math.rsqrt(var + eps)
    if gamma is not None:
        y = y * gamma
    return y + beta if beta is not None else y


def add_positional(x: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
    """``x + table[:T]`` for ``x`` of shape ``(N, T, D)``; ``table`` is ``(P, D)`` or ``(1, P, D)``."""
    t, d = int(x.shape[1]), int(x.shape[2])
    return x + tf.slice(tf.reshape(table, [-1, d]), [0, 0], [t, d])


def _steps(x: tf.Tensor, w_ih: tf.Tensor, b_ih: tf.Tensor | None) -> list[tf.Tensor]:
    """The input projections ``x_t @ w_ih.T + b_ih`` of every time step."""
    gi = linear(x, w_ih, b_ih)
    return tf.unstack(gi, axis=1)


def gru(x: tf.Tensor, w: Mapping[str, tf.Tensor], hidden: int) -> tf.Tensor:
    """Single-layer batch-first ``nn.GRU`` from a zero state; returns every hidden state ``(N, T, H)``."""
    h = tf.zeros([tf.shape(x)[0], hidden])
    outs = []
    b_hh = w.get("bias_hh")
    for gi in _steps(x, w["weight_ih"], w.get("bias_ih")):
        gh = tf.matmul(h, w["weight_hh"], transpose_b=True)
        if b_hh is not None:
            gh = gh + b_hh
        i_r, i_z, i_n = tf.split(gi, 3, axis=1)
        h_r, h_z, h_n = tf.split(gh, 3, axis=1)
        r = tf.math.sigmoid(i_r + h_r)
        z = tf.math.sigmoid(i_z + h_z)
        n = tf.math.tanh(i_n + r * h_n)
        h = (1.0 - z) * n + z * h
        outs.append(h)
    return tf.stack(outs, axis=1)


def lstm(x: tf.Tensor, w: Mapping[str, tf.Tensor], hidden: int) -> tf.Tensor:
    """Single-layer batch-first ``nn.LSTM`` from zero states; returns every hidden state ``(N, T, H)``."""
    h = tf.zeros([tf.shape(x)[0], hidden])
    c = h
    outs = []
    b_hh = w.get("bias_hh")
    for gi in _steps(x, w["weight_ih"], w.get("bias_ih")):
        gates = gi + tf.matmul(h, w["weight_hh"], transpose_b=True)
        if b_hh is not None:
            gates = gates + b_hh
        i, f, g, o = tf.split(gates, 4, axis=1)
        c = tf.math.sigmoid(f) * c + tf.math.sigmoid(i) * tf.math.tanh(g)
        h = tf.math.sigmoid(o) * tf.math.tanh(c)
        outs.append(h)
    return tf.stack(outs, axis=1)


Dropout = Callable[[tf.Tensor, int], tf.Tensor]
"""``drop(h, site)``: ``h`` after the layer's dropout at ``site`` (the identity in eval mode or at rate 0)."""


def _no_dropout(h: tf.Tensor, site: int) -> tf.Tensor:
    return h


def attention(x: tf.Tensor, w: Mapping[str, tf.Tensor], heads: int, prefix: str = "",
              drop: Dropout = _no_dropout) -> tf.Tensor:
    """Self-attention of ``nn.MultiheadAttention(batch_first=True)``: ``attn(x, x, x)[0]`` without masks.

    ``drop(., 0)`` is applied to the attention weights (torch's ``dropout``)."""
    t, e = int(x.shape[1]), int(x.shape[2])
    d = e // heads
    qkv = linear(x, w[f"{prefix}in_proj_weight"], w.get(f"{prefix}in_proj_bias"))
    q, k, v = (tf.transpose(tf.reshape(p, [-1, t, heads, d]), [0, 2, 1, 3]) for p in tf.split(qkv, 3, axis=2))
    scores = tf.matmul(q * (1.0 / math.sqrt(d)), k, transpose_b=True)
    a = drop(tf.nn.softmax(scores, axis=-1), 0)
    o = tf.reshape(tf.transpose(tf.matmul(a, v), [0, 2, 1, 3]), [-1, t, e])
    return linear(o, w[f"{prefix}out_proj_weight"], w.get(f"{prefix}out_proj_bias"))


def _activation(x: tf.Tensor, kind: str) -> tf.Tensor:
    if kind == "relu":
        return tf.nn.relu(x)
    return 0.5 * x * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))


def encoder_layer(x: tf.Tensor, w: Mapping[str, tf.Tensor], *, heads: int, activation: str, norm_first: bool,
                  eps: float, drop: Dropout = _no_dropout) -> tf.Tensor:
    """``nn.TransformerEncoderLayer(batch_first=True)`` without masks; dropout sites (``drop``): 0 the attention
    weights, 1 the feed-forward's ``dropout``, 2 ``dropout1`` (attention branch), 3 ``dropout2`` (feed-forward)."""

    def sa(h: tf.Tensor) -> tf.Tensor:
        return drop(attention(h, w, heads, "self_attn_", drop), 2)

    def ff(h: tf.Tensor) -> tf.Tensor:
        h = drop(_activation(linear(h, w["linear1_weight"], w.get("linear1_bias")), activation), 1)
        return drop(linear(h, w["linear2_weight"], w.get("linear2_bias")), 3)

    def norm(h: tf.Tensor, i: int) -> tf.Tensor:
        return layer_norm(h, w.get(f"norm{i}_weight"), w.get(f"norm{i}_bias"), eps)

    if norm_first:
        x = x + sa(norm(x, 1))
        return x + ff(norm(x, 2))
    x = norm(x + sa(x), 1)
    return norm(x + ff(x), 2)


def _dropout(w: Mapping[str, tf.Tensor], attrs: Mapping[str, Any], training: bool) -> Dropout:
    """The layer's dropout (rates per site in ``attrs["dropout"]``, masks from its ``seed``; see ``.ops.attention``)."""
    rates = [float(r) for r in attrs.get("dropout", ())]
    if not training or not any(rates):
        return _no_dropout
    return lambda h, site: site_dropout(h, rates[site], w["seed"], site)


def seq_forward(kind: str, x: tf.Tensor, w: Mapping[str, tf.Tensor], attrs: Mapping[str, Any],
                training: bool = False) -> tf.Tensor:
    """The forward pass of a sequence layer kind (see :mod:`.ops.embedding`, `.ops.recurrent`, `.ops.attention`);
    ``training``: with the layer's dropout (if any)."""
    if kind == "embedding":
        return tf.gather(w["embeddings"], tf.cast(x, tf.int32))
    if kind == "positional":
        return add_positional(x, w["embeddings"])
    if kind == "gru":
        return gru(x, w, int(attrs["hidden"]))
    if kind == "lstm":
        return lstm(x, w, int(attrs["hidden"]))
    if kind == "attention":
        return attention(x, w, int(attrs["heads"]), drop=_dropout(w, attrs, training))
    if kind == "encoder":
        return encoder_layer(x, w, heads=int(attrs["heads"]), activation=str(attrs["activation"]),
                             norm_first=bool(attrs["norm_first"]), eps=float(attrs["epsilon"]),
                             drop=_dropout(w, attrs, training))
    raise ValueError(f"unknown sequence layer kind {kind!r}")


def seq_backward(kind: str, x: tf.Tensor, g: tf.Tensor, w: Mapping[str, tf.Tensor]) -> tuple[list[tf.Tensor],
                                                                                              dict[str, tf.Tensor]]:
    """Builtin-ops backward pass (input gradients, weight gradients) of ``embedding`` and ``positional``."""
    if kind == "embedding":
        table = w["embeddings"]
        num, dim = int(table.shape[0]), int(table.shape[1])
        onehot = tf.reshape(tf.one_hot(tf.cast(x, tf.int32), num, dtype=tf.float32), [-1, num])
        return [], {"embeddings": tf.matmul(onehot, tf.reshape(g, [-1, dim]), transpose_a=True)}
    if kind == "positional":
        table = w["embeddings"]
        t, d = int(g.shape[1]), int(g.shape[2])
        rows = int(np.prod([int(s) for s in table.shape])) // d
        gt = tf.reduce_sum(g, 0)
        if rows > t:
            gt = tf.pad(gt, [[0, rows - t], [0, 0]])
        return [g], {"embeddings": tf.reshape(gt, table.shape)}
    raise ValueError(f"no builtin-ops backward pass for {kind!r}")


_KERAS_CLASS: list[Any] = []


def keras_layer(kind: str, name: str, weights: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> Any:
    """A ``SplitexportLayer`` (tf_keras) computing ``kind``; TF.js loads it via ``device_runtime/js/src/layers.js``."""
    if not _KERAS_CLASS:
        import tf_keras

        class SplitexportLayer(tf_keras.layers.Layer):  # type: ignore[misc]
            """One sequence layer of the export, weights in torch layout (config: op, weight names/shapes, attrs)."""

            def __init__(self, op: str, weight_names: list[str], weight_shapes: list[list[int]],
                         attrs: dict[str, Any], **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.op, self.weight_names, self.weight_shapes, self.op_attrs = op, weight_names, weight_shapes, attrs

            def build(self, input_shape: Any) -> None:
                # a dropout seed (last) is state, not a trained weight
                self.ws = [self.add_weight(name=n, shape=tuple(s), initializer="zeros", trainable=n != "seed")
                           for n, s in zip(self.weight_names, self.weight_shapes)]
                super().build(input_shape)

            def call(self, x: Any, training: Any = None) -> Any:
                return seq_forward(self.op, x, dict(zip(self.weight_names, self.ws)), self.op_attrs, bool(training))

            def get_config(self) -> dict[str, Any]:
                return {**super().get_config(), "op": self.op, "weight_names": self.weight_names,
                        "weight_shapes": self.weight_shapes, "attrs": self.op_attrs}

        _KERAS_CLASS.append(SplitexportLayer)
    names = list(weights)
    return _KERAS_CLASS[0](kind, names, [list(weights[n].shape) for n in names], dict(attrs), name=name)
