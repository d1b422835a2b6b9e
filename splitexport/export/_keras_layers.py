"""Custom tf_keras layers for ops without a standard Keras layer of torch's semantics.

Each has a JS twin of the same class name in ``device_runtime/js/src/layers.js`` (registered
with ``tf.serialization.registerClass``), so the TF.js runtime loads and trains it; the
classes here exist so that the Keras model can be built, checked against torch and
serialized by ``tensorflowjs``. tf_keras and TensorFlow are imported by whoever imports this.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf
import tf_keras

__all__ = ["CUSTOM_LAYERS", "GroupNorm", "SeededDropout", "TorchActivation", "TorchReduce"]

_C = math.sqrt(2.0 / math.pi)


def _hardsigmoid(x: Any) -> Any:
    return tf.minimum(tf.maximum(x + 3.0, 0.0), 6.0) / 6.0


_FUNCTIONS = {
    "hardsigmoid": _hardsigmoid,
    "hardswish": lambda x: x * _hardsigmoid(x),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + tf.math.tanh(_C * (x + 0.044715 * x * x * x))),
}


class TorchActivation(tf_keras.layers.Layer):  # type: ignore[misc]
    """An activation with torch's formula: ``hardsigmoid``, ``hardswish`` or ``gelu_tanh``."""

    def __init__(self, fn: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if fn not in _FUNCTIONS:
            raise ValueError(f"unknown TorchActivation {fn!r}")
        self.fn = fn

    def call(self, inputs: Any) -> Any:
        return _FUNCTIONS[self.fn](inputs)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "fn": self.fn}


class GroupNorm(tf_keras.layers.Layer):  # type: ignore[misc]
    """torch.nn.GroupNorm on channels-last input (..., C): statistics per sample and group of channels."""

    def __init__(self, groups: int, epsilon: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.epsilon = float(epsilon)

    def build(self, input_shape: Any) -> None:
        c = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        shape = tf.shape(inputs)
        c = int(inputs.shape[-1])
        g = tf.reshape(inputs, [shape[0], -1, self.groups, c // self.groups])
        mean, var = tf.nn.moments(g, axes=[1, 3], keepdims=True)
        y = tf.reshape((g - mean) * tf.math.rsqrt(var + self.epsilon), shape)
        return y * self.gamma + self.beta

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon}


CUSTOM_LAYERS = {"TorchActivation": TorchActivation, "GroupNorm": GroupNorm}
"""Class name -> class (``custom_objects`` for tf_keras deserialization)."""


class TorchReduce(tf_keras.layers.Layer):  # type: ignore[misc]
    """``mean`` or ``sum`` over ``axes`` (of the batched internal layout), optionally keeping them."""

    def __init__(self, op: str, axes: list[int], keepdims: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.op = op
        self.axes = [int(a) for a in axes]
        self.keepdims = bool(keepdims)

    def call(self, inputs: Any) -> Any:
        f = tf.reduce_mean if self.op == "mean" else tf.reduce_sum
        return f(inputs, self.axes, keepdims=self.keepdims)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "op": self.op, "axes": self.axes, "keepdims": self.keepdims}


CUSTOM_LAYERS["TorchReduce"] = TorchReduce


class SeededDropout(tf_keras.layers.Layer):  # type: ignore[misc]
    """Dropout whose mask is a hash of (element index, ``seed``): see ``splitexport/export/ops/dropout.py``."""

    def __init__(self, rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = float(rate)

    def build(self, input_shape: Any) -> None:
        self.seed = self.add_weight(name="seed", shape=(1,), initializer="zeros", trainable=False)
        super().build(input_shape)

    def call(self, inputs: Any, training: Any = None) -> Any:
        from .ops.dropout import uniform

        if not training or self.rate == 0:
            return inputs
        keep = tf.cast(uniform(inputs, self.seed) >= self.rate, inputs.dtype) * (1.0 / (1.0 - self.rate))
        return inputs * keep

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rate": self.rate}


CUSTOM_LAYERS["SeededDropout"] = SeededDropout
