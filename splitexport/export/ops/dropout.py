"""Dropout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._registry import KerasContext, LayerKind, OpSpec, native, register, tf

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def _build(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    b.add(node, "dropout", [x], x.shape, rate=float(m.p))


def _keras(ctx: KerasContext, lyr: Layer, ins: list[Any]) -> Any:
    return ctx.L.Dropout(lyr.attrs["rate"], name=lyr.name)(ins[0])


def _forward(seg: TfSegment, lyr: Layer, ins: list[Any], mode: str, update: bool) -> tuple[Any, dict[str, Any]]:
    x, rate = ins[0], lyr.attrs["rate"]
    if mode == "eval" or rate == 0:
        return tf.identity(x), {"mask": tf.ones_like(x)}
    keep = tf.cast(tf.random.uniform(tf.shape(x)) >= rate, tf.float32) * (1.0 / (1.0 - rate))
    return x * keep, {"mask": keep}


def _backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    return [g * c.extra["mask"]]


_GRADIENT_SEGMENT = "refused in a segment that trains on a received gradient (forward and step would draw " \
    "different masks); last segment only"

register(
    OpSpec(
        "Dropout", "dropout", modules=("Dropout",),
        onnx=native(f"Dropout; {_GRADIENT_SEGMENT}"),
        tfjs=native(f"Dropout; {_GRADIENT_SEGMENT}"),
        tflite_flex=native(f"random mask; {_GRADIENT_SEGMENT}"),
        tflite_builtin=native(f"random mask; {_GRADIENT_SEGMENT}"),
        restrictions="not bit-comparable with torch (independent random masks)",
        build_module=_build, kinds=("dropout",),
    ),
    LayerKind("dropout", _keras, _forward, _backward),
)
