"""A :class:`LayerGraph` as TensorFlow ops: forward passes, a hand-written backward pass, losses, optimizers.

Used to build the TFLite training graphs. :meth:`TfSegment.forward` uses ordinary
TF ops (differentiated by ``tf.GradientTape`` in the Flex variant);
:meth:`TfSegment.backward` computes every gradient with forward-style ops only
(conv2d, conv2d_transpose, matmul, reductions, space_to_depth, ...), so that the
builtin-ops variant converts without Select TF ops. Images are NHWC inside,
NCHW at the boundary. Only imported when exporting (imports TensorFlow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import tensorflow as tf

from .._errors import ExportError
from .._manifest import OptimizerSpec
from ._layergraph import Layer, LayerGraph
from .ops import REGISTRY

Mode = Literal["eval", "train"]

__all__ = ["TfSegment", "optimizer_slots"]


def optimizer_slots(opt: OptimizerSpec) -> tuple[str, ...]:
    """Per-weight optimizer state kept by the TFLite graphs (torch.optim's buffers)."""
    if opt.name == "sgd":
        return ("momentum",) if opt.momentum else ()
    return ("exp_avg", "exp_avg_sq")


@dataclass
class _Cache:
    """What the backward pass needs from the forward pass of one layer."""

    x: list[tf.Tensor]
    y: tf.Tensor
    extra: dict[str, tf.Tensor]


class TfSegment(tf.Module):
    """Variables of a segment plus its forward, backward, loss and optimizer ops."""

    def __init__(self, graph: LayerGraph, optimizer: OptimizerSpec) -> None:
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
        for slot in optimizer_slots(optimizer):
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

    def _layer_forward(
        self, lyr: Layer, ins: list[tf.Tensor], mode: Mode, update: bool
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        return REGISTRY.kind(lyr.kind).forward(self, lyr, ins, mode, update)

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
        return REGISTRY.kind(lyr.kind).backward(self, lyr, c, g, wgrads)

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
        for lyr in self.graph.layers:
            after = REGISTRY.kind(lyr.kind).after_step if lyr.kind != "input" else None
            if after is not None:
                after(self, lyr)
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
        """Raise if a layer cannot be trained with builtin TFLite ops (the op table's refusal, naming the layer)."""
        for lyr in self.graph.layers:
            if lyr.kind == "input":
                continue
            why = REGISTRY.kind(lyr.kind).builtin_refusal(lyr)
            if why:
                raise ExportError(f"{lyr.source}: not supported by the builtin-ops TFLite variant ({why}); "
                                  "use the flex variant, or cut the model so that this layer runs on the server")
