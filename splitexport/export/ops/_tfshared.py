"""TensorFlow computations that an op's TFLite forward and its Keras layer (``_keras_layers``) both run: the
dropout mask (``dropout``) and the effective kernel of grouped and dilated convolutions (``conv``). TensorFlow
is imported on first use."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._registry import tf

HASH = (251.0, 241.0, 1009.0, 12.9898, 78.233, 37.719, 43758.5453)
"""Constants of the mask hash u = fract(sin(a*12.9898 + b*78.233 + s*37.719) * 43758.5453) with
a = i mod 251, b = floor(i / 251) mod 241, s = seed mod 1009 (i: flat element index); the
same in ``_keras_layers.SeededDropout`` (which calls :func:`site_keep`) and ``device_runtime/js/src/layers.js``."""


def uniform(x: Any, seed: Any) -> Any:
    """Pseudo-random numbers in [0, 1) of ``x``'s shape, from ``seed`` (a float tensor of shape [1])."""
    ma, mb, ms, ka, kb, ks, scale = HASH
    per_sample = [int(d) for d in x.shape[1:]]
    numel = int(np.prod(per_sample))
    # flat element index = sample * numel + index within the sample (static shapes but the batch)
    within = tf.constant(np.arange(numel, dtype=np.float32).reshape([1, *per_sample]))
    sample = tf.reshape(tf.cast(tf.range(tf.shape(x)[0]), tf.float32), [-1] + [1] * len(per_sample))
    i = within + sample * float(numel)
    a = i - tf.floor(i / ma) * ma
    q = tf.floor(i / ma)
    b = q - tf.floor(q / mb) * mb
    s = seed - tf.floor(seed / ms) * ms
    v = tf.sin(a * ka + b * kb + s * ks) * scale
    return v - tf.floor(v)


SITES = 4
"""Dropout sites of one layer (plain Dropout: site 0; attention: the attention weights; encoder layer: those, the
feed-forward's ``dropout``, ``dropout1``, ``dropout2``). Site ``k`` of a layer draws from :func:`uniform` with the seed
``seed * SITES + k``: its own mask stream, advancing with the layer's one seed (``device_runtime/js/src/layers.js``
does the same)."""


def site_keep(x: Any, rate: float, seed: Any, site: int) -> Any:
    """The inverted-dropout mask of ``x``'s shape at ``site``: 1 / (1 - rate) with probability 1 - rate, else 0."""
    return tf.cast(uniform(x, seed * float(SITES) + float(site)) >= rate, x.dtype) * (1.0 / (1.0 - rate))


def site_dropout(x: Any, rate: float, seed: Any, site: int) -> Any:
    """Inverted dropout of ``x`` (kept with probability ``1 - rate``, scaled by ``1 / (1 - rate)``) at ``site``."""
    return x if rate == 0 else x * site_keep(x, rate, seed, site)


def effective_kernel(kernel: Any, a: dict[str, Any], depthwise: bool) -> Any:
    """The dense (or depthwise) kernel a plain stride-only convolution runs with, from the trained ``kernel``.

    Grouped (``kh, kw, cin / groups, cout``, Keras' grouped layout): tiled to ``cin`` input channels and
    masked to the block diagonal of the groups. Dilated: ``d - 1`` zeros between the taps of each spatial
    axis. Only pad / reshape / slice / tile / mul, so every runtime differentiates it.
    """
    k = kernel
    groups, cin, cout = a.get("groups", 1), a["in_channels"], a["out_channels"]
    if not depthwise and groups > 1:
        k = tf.tile(k, [1, 1, groups, 1]) * tf.constant(group_mask(cin, cout, groups))
    dh, dw = a.get("dilation", (1, 1))
    kh, kw = a["kernel"]
    if dh > 1:
        k = tf.pad(tf.expand_dims(k, 1), [[0, 0], [0, dh - 1], [0, 0], [0, 0], [0, 0]])
        k = tf.reshape(k, [kh * dh, *[int(v) for v in k.shape[2:]]])[: dh * (kh - 1) + 1]
    if dw > 1:
        k = tf.pad(tf.expand_dims(k, 2), [[0, 0], [0, 0], [0, dw - 1], [0, 0], [0, 0]])
        k = tf.reshape(k, [int(k.shape[0]), kw * dw, *[int(v) for v in k.shape[3:]]])[:, : dw * (kw - 1) + 1]
    return k


def group_mask(cin: int, cout: int, groups: int) -> np.ndarray:
    """mask[ci, co] = 1 where input channel ci and output channel co are in the same group."""
    ci = np.arange(cin)[:, None] // (cin // groups)
    co = np.arange(cout)[None, :] // (cout // groups)
    return (ci == co).astype(np.float32)
