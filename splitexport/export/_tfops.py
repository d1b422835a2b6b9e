"""A :class:`LayerGraph` as TensorFlow ops: forward passes, a hand-written backward pass, losses, optimizers.

Used to build the TFLite training graphs. :meth:`TfSegment.forward` uses ordinary
TF ops (differentiated by ``tf.GradientTape`` in the Flex variant);
:meth:`TfSegment.backward` computes every gradient with forward-style ops only
(conv2d, conv2d_transpose, matmul, reductions, space_to_depth, ...), so that the
builtin-ops variant converts without Select TF ops. Images are NHWC inside,
NCHW at the boundary. Only imported when exporting (imports TensorFlow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from .._errors import ExportError
from ._layergraph import Layer, LayerGraph
from ._seqops import BUILTIN_REASONS, SEQ_KINDS
from ._seqtf import seq_backward, seq_forward

Mode = Literal["eval", "train"]

__all__ = ["BUILTIN_UNSUPPORTED", "OptimizerConfig", "TfSegment"]

BUILTIN_UNSUPPORTED = {"gelu": "GELU needs erf, which has no builtin TFLite kernel", **BUILTIN_REASONS}
"""Layer kinds the builtin-ops variant refuses, with the reason."""


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer of a device segment (torch semantics): sgd (momentum, weight decay), adam, adamw."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def slots(self) -> tuple[str, ...]:
        if self.name == "sgd":
            return ("momentum",) if self.momentum else ()
        if self.name in ("adam", "adamw"):
            return ("exp_avg", "exp_avg_sq")
        raise ExportError(f"unknown optimizer {self.name!r}; expected sgd, adam or adamw")


def _count(x: tf.Tensor, axes: list[int]) -> tf.Tensor:
    """Number of elements reduced over ``axes`` (static when the shape is known)."""
    dims = [x.shape[i] for i in axes]
    if all(d is not None for d in dims):
        return tf.constant(float(np.prod([int(d) for d in dims])))
    return tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)


@dataclass
class _Cache:
    """What the backward pass needs from the forward pass of one layer."""

    x: list[tf.Tensor]
    y: tf.Tensor
    extra: dict[str, tf.Tensor]


class TfSegment(tf.Module):
    """Variables of a segment plus its forward, backward, loss and optimizer ops."""

    def __init__(self, graph: LayerGraph, optimizer: OptimizerConfig) -> None:
        super().__init__(name="segment")
        self.graph = graph
        self.opt = optimizer
        self.vars: dict[str, tf.Variable] = {}
        self.trainable: list[str] = []
        for lyr in graph.layers:
            for key, value in lyr.weights.items():
                name = f"{lyr.name}/{key}"
                self.vars[name] = tf.Variable(value, name=name.replace("/", "__"), trainable=key in lyr.trainable)
                if key in lyr.trainable:
                    self.trainable.append(name)
        self.slot_vars: dict[str, tf.Variable] = {}
        for slot in optimizer.slots():
            for name in self.trainable:
                self.slot_vars[f"{name}/{slot}"] = tf.Variable(
                    tf.zeros_like(self.vars[name]), name=f"{name}/{slot}".replace("/", "__")
                )
        self.step = tf.Variable([0.0], name="optimizer_step")

    # ------------------------------------------------------------------ state
    def state_names(self) -> list[str]:
        """Every variable saved by ``save``: weights, BN statistics, optimizer slots, step."""
        return [*self.vars, *self.slot_vars, "optimizer/step"]

    def state_variables(self) -> list[tf.Variable]:
        return [*self.vars.values(), *self.slot_vars.values(), self.step]

    # ------------------------------------------------------------------ forward
    def forward(self, x: tf.Tensor, mode: Mode, *, update_stats: bool = False) -> tuple[tf.Tensor, dict[str, _Cache]]:
        """Run the segment on NCHW (or N x F) ``x``; returns the output in torch layout and the caches.

        ``mode="train"`` uses batch statistics for BatchNorm (and dropout); with
        ``update_stats`` the moving statistics are updated as torch does (unbiased
        variance).
        """
        g = self.graph
        h = tf.transpose(x, [0, 2, 3, 1]) if len(g.input_shape) == 3 else x
        values: dict[str, tf.Tensor] = {}
        caches: dict[str, _Cache] = {}
        for lyr in g.layers:
            if lyr.kind == "input":
                values[lyr.name] = h
                continue
            ins = [values[i] for i in lyr.inputs]
            y, extra = self._layer_forward(lyr, ins, mode, update_stats)
            values[lyr.name] = y
            caches[lyr.name] = _Cache(ins, y, extra)
        out = values[g.output]
        if len(g.output_shape) == 3:
            out = tf.transpose(out, [0, 3, 1, 2])
        return out, caches

    def w(self, lyr: Layer, key: str) -> tf.Tensor:
        return self.vars[f"{lyr.name}/{key}"]

    def layer_weights(self, lyr: Layer) -> dict[str, tf.Tensor]:
        return {key: self.w(lyr, key) for key in lyr.weights}

    def _layer_forward(
        self, lyr: Layer, ins: list[tf.Tensor], mode: Mode, update: bool
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        a = lyr.attrs
        k = lyr.kind
        x: Any = ins[0] if ins else None
        if k in ("conv2d", "depthwise2d"):
            t, b, left, r = a["pads"]
            xp = tf.pad(x, [[0, 0], [t, b], [left, r], [0, 0]]) if any(a["pads"]) else x
            strides = [1, a["strides"][0], a["strides"][1], 1]
            if k == "conv2d":
                y = tf.nn.conv2d(xp, self.w(lyr, "kernel"), strides, "VALID")
            else:
                y = tf.nn.depthwise_conv2d(xp, self.w(lyr, "depthwise_kernel"), strides, "VALID")
            if "bias" in lyr.weights:
                y = y + self.w(lyr, "bias")
            return y, {"xp": xp}
        if k == "batchnorm":
            axes = list(range(len(x.shape) - 1))
            gamma, beta = self.w(lyr, "gamma"), self.w(lyr, "beta")
            eps = a["epsilon"]
            if mode == "eval":
                inv = tf.math.rsqrt(self.w(lyr, "moving_variance") + eps)
                return (x - self.w(lyr, "moving_mean")) * (inv * gamma) + beta, {}
            mean = tf.reduce_mean(x, axes)
            xc = x - mean
            var = tf.reduce_mean(xc * xc, axes)
            inv = tf.math.rsqrt(var + eps)
            xhat = xc * inv
            if update:
                n = _count(x, axes)
                m = a["momentum"]
                mm, mv = self.vars[f"{lyr.name}/moving_mean"], self.vars[f"{lyr.name}/moving_variance"]
                mm.assign(mm * (1.0 - m) + tf.stop_gradient(mean) * m)
                mv.assign(mv * (1.0 - m) + tf.stop_gradient(var) * (m * n / tf.maximum(n - 1.0, 1.0)))
            return xhat * gamma + beta, {"xhat": xhat, "inv": inv}
        if k == "relu":
            return tf.nn.relu(x), {}
        if k == "sigmoid":
            return tf.math.sigmoid(x), {}
        if k == "tanh":
            return tf.math.tanh(x), {}
        if k == "gelu":
            return 0.5 * x * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0)))), {}
        if k == "maxpool2d":
            return tf.nn.max_pool2d(x, list(a["pool"]), list(a["strides"]), "VALID"), {}
        if k == "gap":
            return tf.reduce_mean(x, [1, 2], keepdims=True), {}
        if k == "flatten":
            return tf.reshape(tf.transpose(x, [0, 3, 1, 2]), [-1, lyr.shape[0]]), {}
        if k == "linear":
            y = tf.matmul(x, self.w(lyr, "kernel"))
            if "bias" in lyr.weights:
                y = y + self.w(lyr, "bias")
            return y, {}
        if k in SEQ_KINDS:
            return seq_forward(k, x, self.layer_weights(lyr), a), {}
        if k == "dropout":
            rate = a["rate"]
            if mode == "eval" or rate == 0:
                return tf.identity(x), {"mask": tf.ones_like(x)}
            keep = tf.cast(tf.random.uniform(tf.shape(x)) >= rate, tf.float32) * (1.0 / (1.0 - rate))
            return x * keep, {"mask": keep}
        if k == "add":
            return ins[0] + ins[1], {}
        if k == "concat":
            return tf.concat(ins, axis=a["axis"]), {}
        raise ExportError(f"{lyr.source}: no TensorFlow mapping for {k}")  # pragma: no cover

    # ------------------------------------------------------------------ backward (builtin ops only)
    def backward(self, caches: dict[str, _Cache], grad_out: tf.Tensor) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """dL/d(input) (torch layout) and dL/d(weight) for every trainable weight, given dL/d(output)."""
        g = self.graph
        if len(g.output_shape) == 3:
            grad_out = tf.transpose(grad_out, [0, 2, 3, 1])
        grads: dict[str, tf.Tensor] = {g.output: grad_out}
        wgrads: dict[str, tf.Tensor] = {}
        for lyr in reversed(g.layers):
            if lyr.kind == "input" or lyr.name not in grads:
                continue
            gin = self._layer_backward(lyr, caches[lyr.name], grads.pop(lyr.name), wgrads)
            for src, gi in zip(lyr.inputs, gin):
                grads[src] = grads[src] + gi if src in grads else gi
        gx = grads.get("input", tf.zeros([1]))  # integer ids have no gradient
        if len(g.input_shape) == 3:
            gx = tf.transpose(gx, [0, 3, 1, 2])
        return gx, wgrads

    def _layer_backward(self, lyr: Layer, c: _Cache, g: tf.Tensor, wgrads: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        a = lyr.attrs
        k = lyr.kind
        x: Any = c.x[0] if c.x else None
        if k in ("conv2d", "depthwise2d"):
            xp = c.extra["xp"]
            n, hp, wp, cin = (int(d) for d in xp.shape)
            kh, kw = a["kernel"]
            sh, sw = a["strides"]
            cout = a["out_channels"]
            if k == "conv2d":
                kernel = self.w(lyr, "kernel")
            else:  # depthwise as a block-diagonal full convolution
                m = a["multiplier"]
                eye = tf.constant(np.eye(cin, dtype=np.float32).reshape(1, 1, cin, cin, 1))
                kernel = tf.reshape(
                    tf.reshape(self.w(lyr, "depthwise_kernel"), [kh, kw, cin, 1, m]) * eye, [kh, kw, cin, cout]
                )
            gxp = tf.nn.conv2d_transpose(g, kernel, [n, hp, wp, cin], [1, sh, sw, 1], "VALID")
            t, _, left, _ = a["pads"]
            h, w = int(x.shape[1]), int(x.shape[2])
            gx = tf.slice(gxp, [0, t, left, 0], [n, h, w, cin]) if any(a["pads"]) else gxp
            # dW[i, j, ci, co] = sum_{n, y, x} xp[n, y*s + i, x*s + j, ci] * g[n, y, x, co]
            full = tf.nn.conv2d(
                tf.transpose(xp, [3, 1, 2, 0]),
                tf.transpose(g, [1, 2, 0, 3]),
                [1, 1, 1, 1],
                "VALID",
                dilations=[1, sh, sw, 1],
            )
            full = tf.transpose(tf.slice(full, [0, 0, 0, 0], [cin, kh, kw, cout]), [1, 2, 0, 3])
            if k == "conv2d":
                wgrads[f"{lyr.name}/kernel"] = full
            else:
                m = a["multiplier"]
                eye = tf.constant(np.eye(cin, dtype=np.float32).reshape(1, 1, cin, cin, 1))
                wgrads[f"{lyr.name}/depthwise_kernel"] = tf.reduce_sum(
                    tf.reshape(full, [kh, kw, cin, cin, m]) * eye, axis=3
                )
            if "bias" in lyr.weights:
                wgrads[f"{lyr.name}/bias"] = tf.reduce_sum(g, [0, 1, 2])
            return [gx]
        if k == "batchnorm":
            axes = list(range(len(x.shape) - 1))
            count = float(math.prod(int(x.shape[i]) for i in axes))
            xhat, inv = c.extra["xhat"], c.extra["inv"]
            dbeta = tf.reduce_sum(g, axes)
            dgamma = tf.reduce_sum(g * xhat, axes)
            wgrads[f"{lyr.name}/gamma"] = dgamma
            wgrads[f"{lyr.name}/beta"] = dbeta
            scale = self.w(lyr, "gamma") * inv * (1.0 / count)
            return [scale * (g * count - dbeta - xhat * dgamma)]
        if k == "relu":
            return [g * tf.cast(c.y > 0.0, tf.float32)]
        if k == "sigmoid":
            return [g * c.y * (1.0 - c.y)]
        if k == "tanh":
            return [g * (1.0 - c.y * c.y)]
        if k == "gelu":
            cdf = 0.5 * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))
            pdf = tf.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
            return [g * (cdf + x * pdf)]
        if k == "maxpool2d":
            return [self._maxpool_backward(lyr, x, g)]
        if k == "gap":
            h, w = int(x.shape[1]), int(x.shape[2])
            return [tf.broadcast_to(g * (1.0 / (h * w)), tf.shape(x))]
        if k == "flatten":
            n, h, w, ch = (int(d) for d in x.shape)
            return [tf.transpose(tf.reshape(g, [n, ch, h, w]), [0, 2, 3, 1])]
        if k == "linear":
            wgrads[f"{lyr.name}/kernel"] = tf.matmul(x, g, transpose_a=True)
            if "bias" in lyr.weights:
                wgrads[f"{lyr.name}/bias"] = tf.reduce_sum(g, 0)
            return [tf.matmul(g, self.w(lyr, "kernel"), transpose_b=True)]
        if k in ("embedding", "positional"):
            gin, wg = seq_backward(k, x, g, self.layer_weights(lyr))
            wgrads.update({f"{lyr.name}/{key}": v for key, v in wg.items()})
            return gin
        if k == "dropout":
            return [g * c.extra["mask"]]
        if k == "add":
            return [g, g]
        if k == "concat":
            return list(tf.split(g, a["sizes"], axis=a["axis"]))
        raise ExportError(f"{lyr.source}: no backward for {k}")  # pragma: no cover

    @staticmethod
    def _maxpool_backward(lyr: Layer, x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
        """Route ``g`` to the first maximum of each window (torch's choice), for kernel == stride."""
        kh, kw = lyr.attrs["pool"]
        if (kh, kw) != tuple(lyr.attrs["strides"]) or kh != kw:
            raise ExportError(
                f"{lyr.source}: the builtin-ops TFLite variant supports square MaxPool2d with kernel == stride"
            )
        n, h, w, ch = (int(d) for d in x.shape)
        ho, wo = h // kh, w // kw
        xc = tf.slice(x, [0, 0, 0, 0], [n, ho * kh, wo * kw, ch]) if (ho * kh, wo * kw) != (h, w) else x
        win = tf.reshape(tf.nn.space_to_depth(xc, kh), [n, ho, wo, kh * kw, ch])
        first = tf.one_hot(tf.argmax(win, axis=3, output_type=tf.int32), kh * kw, axis=3, dtype=tf.float32)
        routed = tf.reshape(first * tf.expand_dims(g, 3), [n, ho, wo, kh * kw * ch])
        gx = tf.nn.depth_to_space(routed, kh)
        if (ho * kh, wo * kw) != (h, w):
            gx = tf.pad(gx, [[0, 0], [0, h - ho * kh], [0, w - wo * kw], [0, 0]])
        return gx

    # ------------------------------------------------------------------ losses
    @staticmethod
    def aux_loss(out: tf.Tensor, grad: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``0.5 * sum((out - t)^2)`` with ``t = out - g`` (= ``0.5 * sum(g^2)``), and its gradient: exactly ``g``.

        Differentiated as ``sum(out * g)``: ``out - (out - g)`` in float32 loses the low bits of ``g``
        when ``|g| << |out|``, which Adam's normalisation turns into visible weight differences.
        """
        g = tf.stop_gradient(grad)
        linear = tf.reduce_sum(out * g)
        return 0.5 * tf.reduce_sum(g * g) + (linear - tf.stop_gradient(linear)), g

    @staticmethod
    def label_loss(out: tf.Tensor, labels: tf.Tensor, kind: str) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean cross-entropy (int labels) or mean MSE, and dL/d(out)."""
        n = int(out.shape[0]) if out.shape[0] is not None else None
        batch = tf.cast(tf.shape(out)[0], tf.float32) if n is None else float(n)
        if kind == "cross_entropy":
            z = out - tf.stop_gradient(tf.reduce_max(out, axis=1, keepdims=True))
            lse = tf.math.log(tf.reduce_sum(tf.exp(z), axis=1, keepdims=True))
            onehot = tf.one_hot(labels, int(out.shape[1]), dtype=tf.float32)
            logp = z - lse
            loss = -tf.reduce_sum(onehot * logp) / batch
            return loss, (tf.exp(logp) - onehot) / batch
        if kind == "mse":
            diff = out - tf.reshape(labels, tf.shape(out))
            count = batch * float(np.prod([int(d) for d in out.shape[1:]]))
            return tf.reduce_sum(diff * diff) / count, diff * (2.0 / count)
        raise ExportError(f"unknown loss kind {kind!r}; expected cross_entropy or mse")

    # ------------------------------------------------------------------ optimizer
    def apply_gradients(self, wgrads: dict[str, tf.Tensor]) -> None:
        """One optimizer step with torch semantics."""
        o = self.opt
        self.step.assign_add([1.0])
        for name in self.trainable:
            p = self.vars[name]
            gr = wgrads[name]
            if o.name == "sgd":
                if o.weight_decay:
                    gr = gr + o.weight_decay * p
                if o.momentum:
                    buf = self.slot_vars[f"{name}/momentum"]
                    buf.assign(buf * o.momentum + gr)
                    gr = buf.read_value()
                p.assign_sub(gr * o.lr)
                continue
            b1, b2 = o.betas
            if o.name == "adamw" and o.weight_decay:
                p.assign(p * (1.0 - o.lr * o.weight_decay))
            elif o.weight_decay:
                gr = gr + o.weight_decay * p
            m1 = self.slot_vars[f"{name}/exp_avg"]
            m2 = self.slot_vars[f"{name}/exp_avg_sq"]
            m1.assign(m1 * b1 + gr * (1.0 - b1))
            m2.assign(m2 * b2 + gr * gr * (1.0 - b2))
            bc1 = 1.0 - tf.pow(tf.constant(b1), self.step)
            bc2 = 1.0 - tf.pow(tf.constant(b2), self.step)
            denom = tf.sqrt(m2) / tf.sqrt(bc2) + o.eps
            p.assign_sub(m1 / denom * (o.lr / bc1))

    def check_builtin(self) -> None:
        """Raise if a layer cannot be trained with builtin TFLite ops."""
        for lyr in self.graph.layers:
            if lyr.kind in BUILTIN_UNSUPPORTED:
                raise ExportError(
                    f"{lyr.source}: not supported by the builtin-ops TFLite variant ({BUILTIN_UNSUPPORTED[lyr.kind]}); use the flex variant"
                )
            if lyr.kind == "maxpool2d" and (
                tuple(lyr.attrs["pool"]) != tuple(lyr.attrs["strides"]) or lyr.attrs["pool"][0] != lyr.attrs["pool"][1]
            ):
                raise ExportError(
                    f"{lyr.source}: the builtin-ops TFLite variant supports square MaxPool2d with kernel == stride only; use the flex variant"
                )
