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

from .ops._tfshared import effective_kernel, site_keep

__all__ = ["CUSTOM_LAYERS", "GroupNorm", "SeededDropout", "TorchActivation", "TorchConv2D", "TorchReduce"]

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
    """Dropout whose mask is a hash of (element index, ``seed * SITES``): see ``splitexport/export/ops/dropout.py``."""

    def __init__(self, rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = float(rate)

    def build(self, input_shape: Any) -> None:
        self.seed = self.add_weight(name="seed", shape=(1,), initializer="zeros", trainable=False)
        super().build(input_shape)

    def call(self, inputs: Any, training: Any = None) -> Any:
        if not training or self.rate == 0:
            return inputs
        return inputs * site_keep(inputs, self.rate, self.seed, 0)  # a plain Dropout is site 0 of its layer

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rate": self.rate}


CUSTOM_LAYERS["SeededDropout"] = SeededDropout


class TorchConv2D(tf_keras.layers.Layer):  # type: ignore[misc]
    """A grouped and / or dilated convolution (valid padding; a ZeroPadding2D comes first) with torch's semantics.

    Runs a plain (or depthwise) convolution on the effective kernel of ``splitexport/export/ops/conv.py``
    (tiled + block-diagonal for groups, zeros between the taps for dilation), so that TF.js, which has no
    grouped Conv2D and no gradient of a dilated one, trains it. The kernel keeps Keras' layout:
    ``(kh, kw, in_channels / groups, filters)``, or ``(kh, kw, in_channels, multiplier)`` when ``depthwise``.
    """

    def __init__(self, filters: int, kernel_size: list[int], strides: list[int], dilation: list[int], groups: int,
                 in_channels: int, depthwise: bool = False, use_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = [int(k) for k in kernel_size]
        self.strides = [int(s) for s in strides]
        self.dilation = [int(d) for d in dilation]
        self.groups = int(groups)
        self.in_channels = int(in_channels)
        self.depthwise = bool(depthwise)
        self.use_bias = bool(use_bias)

    def _attrs(self) -> dict[str, Any]:
        return {"kernel": tuple(self.kernel_size), "dilation": tuple(self.dilation), "groups": self.groups,
                "in_channels": self.in_channels, "out_channels": self.filters}

    def build(self, input_shape: Any) -> None:
        kh, kw = self.kernel_size
        if self.depthwise:
            shape = (kh, kw, self.in_channels, self.filters // self.in_channels)
            self.kernel = self.add_weight(name="depthwise_kernel", shape=shape)
        else:
            self.kernel = self.add_weight(name="kernel", shape=(kh, kw, self.in_channels // self.groups, self.filters))
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        k = effective_kernel(self.kernel, self._attrs(), self.depthwise)
        strides = [1, *self.strides, 1]
        if self.depthwise:
            y = tf.nn.depthwise_conv2d(inputs, k, strides, "VALID")
        else:
            y = tf.nn.conv2d(inputs, k, strides, "VALID")
        return y + self.bias if self.use_bias else y

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "dilation": self.dilation, "groups": self.groups,
                "in_channels": self.in_channels, "depthwise": self.depthwise, "use_bias": self.use_bias}


CUSTOM_LAYERS["TorchConv2D"] = TorchConv2D
