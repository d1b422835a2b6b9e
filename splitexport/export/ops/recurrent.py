"""Recurrent layers: single-layer, unidirectional, batch-first GRU and LSTM from a zero state.

One ``SplitexportLayer`` each (TF.js: ``device_runtime/js/src/layers.js``; TensorFlow:
:mod:`.._seqtf`), unrolled over the (static) sequence length, weights in torch's layout
(``weight_ih_l0`` -> ``weight_ih``). Only the output sequence (``rnn(x)[0]``) may be used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._errors import ExportError
from ._registry import LayerKind, OpSpec, decomposed, native, refused, register
from .embedding import SERVER, forward_seq, keras_seq

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node
    from .._tfops import TfSegment, _Cache


def check_sequence(node: _Node, x: Layer, what: str) -> int:
    """The length T of a float N x T x F input (else an error naming the layer)."""
    if len(x.shape) != 2 or x.attrs.get("dtype", "float32") != "float32":
        raise ExportError(f"{node.describe()}: {what} expects a float N x T x F input, got per-sample shape {x.shape}")
    return int(x.shape[0])


def check_flags(node: _Node, allowed: tuple[int, ...]) -> None:
    """Further call arguments may be None or bools, which only the listed positions may set (need_weights)."""
    for i, v in enumerate(node.args[1:], 1):
        if isinstance(v, bool) and v and i not in allowed:
            raise ExportError(f"{node.describe()}: argument {i} = True (is_causal / masks) is not supported; {SERVER}")
    for k, v in node.kwargs.items():
        if v is not None and k not in ("need_weights", "average_attn_weights") and v is not False:
            raise ExportError(f"{node.describe()}: argument {k}={v!r} is not supported (masks / states); {SERVER}")


def _build(kind: str) -> Any:
    def build(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
        mtype = kind.upper()
        steps = check_sequence(node, x, mtype)
        check_flags(node, ())
        if len(node.args) > 1 and node.args[1] is not None:
            raise ExportError(f"{node.describe()}: an initial state is not supported (zero state only); {SERVER}")
        if int(m.num_layers) != 1 or bool(m.bidirectional) or not bool(m.batch_first) or int(m.proj_size or 0):
            raise ExportError(
                f"{node.describe()}: only single-layer, unidirectional {mtype} with batch_first=True (no proj_size) "
                f"is supported; stack single-layer {mtype}s or {SERVER}"
            )
        lyr = b.add(node, kind, [x], (steps, int(m.hidden_size)), hidden=int(m.hidden_size))
        for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            if key.startswith("weight") or bool(m.bias):
                b.param(node, lyr, key, f"{key}_l0")
        b.tuple_output(node, lyr, f"only the output sequence of {mtype} (rnn(x)[0]) is supported, not its final "
                                  "state; use output[:, -1] or pool the output")

    return build


def _no_builtin_backward(seg: TfSegment, lyr: Layer, c: _Cache, g: Any, wgrads: dict[str, Any]) -> list[Any]:
    raise ExportError(f"{lyr.source}: no builtin-ops backward pass")  # pragma: no cover - refused before


def _refusal(what: str) -> Any:
    return lambda lyr: f"{what} has no builtin-ops backward pass"


_FLEX = "unrolled matmul / sigmoid / tanh, GradientTape"
_RESTRICT = "one layer, unidirectional, batch_first, no initial state; only output (rnn(x)[0]) used"
register(
    OpSpec(
        "GRU", "recurrent", modules=("GRU",),
        onnx=decomposed("cell equations unrolled over the sequence before export (the fused GRU renames the weights)"), tfjs=native("SplitexportLayer 'gru' (layers.js)"), tflite_flex=native(_FLEX),
        tflite_builtin=refused(f"no backward pass through time from builtin ops; use the flex variant or {SERVER}"),
        restrictions=_RESTRICT, build_module=_build("gru"), kinds=("gru",),
    ),
    OpSpec(
        "LSTM", "recurrent", modules=("LSTM",),
        onnx=decomposed("cell equations unrolled over the sequence before export (the fused LSTM renames the weights)"), tfjs=native("SplitexportLayer 'lstm' (layers.js)"), tflite_flex=native(_FLEX),
        tflite_builtin=refused(f"no backward pass through time from builtin ops; use the flex variant or {SERVER}"),
        restrictions=_RESTRICT + "; no proj_size", build_module=_build("lstm"), kinds=("lstm",),
    ),
    LayerKind("gru", keras_seq, forward_seq, _no_builtin_backward, builtin_refusal=_refusal("GRU")),
    LayerKind("lstm", keras_seq, forward_seq, _no_builtin_backward, builtin_refusal=_refusal("LSTM")),
)
