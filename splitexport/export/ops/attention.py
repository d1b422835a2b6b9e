"""Attention: ``nn.MultiheadAttention`` self-attention and ``nn.TransformerEncoderLayer`` (batch first).

One ``SplitexportLayer`` each (TF.js: ``device_runtime/js/src/layers.js``; TensorFlow:
:mod:`.._seqtf`): scaled dot-product attention from matmul + softmax, the encoder layer's
LayerNorms, feed-forward and residuals inside. Dropout must be 0 (a device mask cannot match
torch's) and masks are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._errors import ExportError
from ._registry import LayerKind, OpSpec, native, refused, register
from .embedding import SERVER, forward_seq, keras_seq
from .recurrent import _no_builtin_backward, _refusal, check_flags, check_sequence

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node


def _no_dropout(node: _Node, p: float, what: str) -> None:
    if p:
        raise ExportError(
            f"{node.describe()}: {what} dropout={p} is not supported on the device (its masks cannot match the "
            f"server's); construct it with dropout=0.0 or {SERVER}"
        )


def _heads(node: _Node, m: Any, what: str) -> int:
    if not bool(m.batch_first) or not bool(m._qkv_same_embed_dim) or m.bias_k is not None or bool(m.add_zero_attn):
        raise ExportError(
            f"{node.describe()}: only batch_first attention with equal q/k/v sizes, no bias_k/bias_v and no "
            f"add_zero_attn is supported; {SERVER}"
        )
    _no_dropout(node, float(m.dropout), f"{what} attention")
    return int(m.num_heads)


def _params(b: _Builder, node: _Node, lyr: Layer, m: Any, prefix: str) -> None:
    key = prefix.replace(".", "_")
    b.param(node, lyr, f"{key}in_proj_weight", f"{prefix}in_proj_weight")
    if m.in_proj_bias is not None:
        b.param(node, lyr, f"{key}in_proj_bias", f"{prefix}in_proj_bias")
    b.param(node, lyr, f"{key}out_proj_weight", f"{prefix}out_proj.weight")
    if m.out_proj.bias is not None:
        b.param(node, lyr, f"{key}out_proj_bias", f"{prefix}out_proj.bias")


def _build_mha(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    if len(node.args) < 3 or not node.args[0] == node.args[1] == node.args[2]:
        raise ExportError(f"{node.describe()}: only self-attention attn(x, x, x) is supported; {SERVER}")
    check_sequence(node, x, "MultiheadAttention")
    check_flags(node, (4, 6))  # TorchScript passes need_weights and average_attn_weights positionally
    lyr = b.add(node, "attention", [x], x.shape, heads=_heads(node, m, "MultiheadAttention"))
    _params(b, node, lyr, m, "")
    b.tuple_output(node, lyr, "only the output of MultiheadAttention (attn(x, x, x)[0]) is supported, not the "
                              "attention weights")


def _build_encoder(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    check_sequence(node, x, "TransformerEncoderLayer")
    check_flags(node, ())
    act = {1: "relu", 2: "gelu"}.get(int(m.activation_relu_or_gelu))
    if act is None:
        raise ExportError(f"{node.describe()}: only activation 'relu' or 'gelu' is supported; {SERVER}")
    for sub in ("dropout", "dropout1", "dropout2"):
        _no_dropout(node, float(getattr(m, sub).p), "TransformerEncoderLayer")
    eps = float(m.norm1.eps)
    if float(m.norm2.eps) != eps or not m.norm1.elementwise_affine or not m.norm2.elementwise_affine:
        raise ExportError(f"{node.describe()}: the two LayerNorms must be affine with the same eps; {SERVER}")
    heads = _heads(node, m.self_attn, "TransformerEncoderLayer")
    lyr = b.add(node, "encoder", [x], x.shape, heads=heads, activation=act, norm_first=bool(m.norm_first), epsilon=eps)
    _params(b, node, lyr, m.self_attn, "self_attn.")
    for sub in ("linear1", "linear2", "norm1", "norm2"):
        for p in ("weight", "bias"):
            if getattr(getattr(m, sub), p, None) is not None:
                b.param(node, lyr, f"{sub}_{p}", f"{sub}.{p}")


_BUILTIN = refused(f"no builtin-ops backward pass for attention; use the flex variant or {SERVER}")
register(
    OpSpec(
        "MultiheadAttention", "attention", modules=("MultiheadAttention",),
        onnx=native("MatMul / Softmax (a scripted layer is rebuilt in Python before export); dropout > 0 trains: "
                    "ORT draws the masks in the last segment; before the server the layer is written out per head "
                    "with mask inputs (not bit-comparable with torch; checked to converge, test_onnx_ops.py)"),
        tfjs=native("SplitexportLayer 'attention' (layers.js)"),
        tflite_flex=native("matmul + softmax, GradientTape"), tflite_builtin=_BUILTIN,
        restrictions="batch_first self-attention attn(x, x, x)[0]; no masks, bias_k/v, add_zero_attn; dropout 0 "
                     "(TF.js / TFLite; ONNX: see its cell)",
        build_module=_build_mha, kinds=("attention",),
    ),
    OpSpec(
        "TransformerEncoderLayer", "attention", modules=("TransformerEncoderLayer",),
        onnx=native("MatMul / Softmax / LayerNormalization (a scripted layer is rebuilt in Python before export); "
                    "dropout > 0 trains: ORT draws the masks in the last segment; before the server the layer is "
                    "written out with mask inputs (batch_first only; not bit-comparable with torch; checked to "
                    "converge, test_onnx_ops.py)"),
        tfjs=native("SplitexportLayer 'encoder' (layers.js)"),
        tflite_flex=native("attention + LayerNorm + feed-forward, GradientTape"), tflite_builtin=_BUILTIN,
        restrictions="batch_first; activation relu or gelu; norm_first either; no masks; dropout 0 (TF.js / TFLite; "
                     "ONNX: see its cell)",
        build_module=_build_encoder, kinds=("encoder",),
    ),
    LayerKind("attention", keras_seq, forward_seq, _no_builtin_backward, builtin_refusal=_refusal("attention")),
    LayerKind("encoder", keras_seq, forward_seq, _no_builtin_backward,
              builtin_refusal=_refusal("the transformer encoder layer")),
)
