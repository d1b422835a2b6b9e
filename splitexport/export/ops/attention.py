"""Attention: ``nn.MultiheadAttention`` self-attention and ``nn.TransformerEncoderLayer`` (batch first).

One ``SplitexportLayer`` each (TF.js: ``device_runtime/js/src/layers.js``; TensorFlow:
:mod:`.._seqtf`): scaled dot-product attention from matmul + softmax, the encoder layer's
LayerNorms, feed-forward and residuals inside. Masks are refused.

Dropout (p > 0) trains as plain Dropout does (:mod:`.dropout`): the layer gets a ``seed`` state
weight (last, non-trainable) and ``attrs["dropout"]``, the rate of each dropout site: the attention
weights (site 0); for the encoder layer also the feed-forward's ``dropout`` (1), ``dropout1`` (2)
and ``dropout2`` (3). Site ``k`` draws its mask from the hash with seed ``seed * SITES + k``
(:func:`._tfshared.site_dropout`), so the sites' masks differ; ``forward`` and ``train`` use the
current seed and every training step advances it. The seed starts at a value of the layer's
qualified name (:func:`.dropout.add_seed`, shared with plain Dropout), so that stacked layers do not
draw the same masks. Not bit-comparable with torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._errors import ExportError
from ._registry import LayerKind, OpSpec, native, refused, register
from ._tfshared import SITES
from .dropout import add_seed, advance_seed
from .embedding import SERVER, forward_seq, keras_seq
from .recurrent import _no_builtin_backward, _refusal, check_flags, check_sequence

if TYPE_CHECKING:
    from .._layergraph import Layer, _Builder, _Node


def _heads(node: _Node, m: Any) -> int:
    if not bool(m.batch_first) or not bool(m._qkv_same_embed_dim) or m.bias_k is not None or bool(m.add_zero_attn):
        raise ExportError(
            f"{node.describe()}: only batch_first attention with equal q/k/v sizes, no bias_k/bias_v and no "
            f"add_zero_attn is supported; {SERVER}"
        )
    return int(m.num_heads)


def _dropout(b: _Builder, node: _Node, lyr: Layer, rates: list[float]) -> None:
    """With any rate > 0: the rates per site (``attrs["dropout"]``) and the ``seed`` state, added last."""
    assert len(rates) <= SITES
    if any(rates):
        lyr.attrs["dropout"] = rates
        add_seed(b, node, lyr)


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
    lyr = b.add(node, "attention", [x], x.shape, heads=_heads(node, m))
    _params(b, node, lyr, m, "")
    _dropout(b, node, lyr, [float(m.dropout)])
    b.tuple_output(node, lyr, "only the output of MultiheadAttention (attn(x, x, x)[0]) is supported, not the "
                              "attention weights")


def _build_encoder(b: _Builder, node: _Node, m: Any, x: Layer) -> None:
    check_sequence(node, x, "TransformerEncoderLayer")
    check_flags(node, ())
    act = {1: "relu", 2: "gelu"}.get(int(m.activation_relu_or_gelu))
    if act is None:
        raise ExportError(f"{node.describe()}: only activation 'relu' or 'gelu' is supported; {SERVER}")
    eps = float(m.norm1.eps)
    if float(m.norm2.eps) != eps or not m.norm1.elementwise_affine or not m.norm2.elementwise_affine:
        raise ExportError(f"{node.describe()}: the two LayerNorms must be affine with the same eps; {SERVER}")
    heads = _heads(node, m.self_attn)
    lyr = b.add(node, "encoder", [x], x.shape, heads=heads, activation=act, norm_first=bool(m.norm_first), epsilon=eps)
    _params(b, node, lyr, m.self_attn, "self_attn.")
    for sub in ("linear1", "linear2", "norm1", "norm2"):
        for p in ("weight", "bias"):
            if getattr(getattr(m, sub), p, None) is not None:
                b.param(node, lyr, f"{sub}_{p}", f"{sub}.{p}")
    _dropout(b, node, lyr, [float(m.self_attn.dropout),
                            *(float(getattr(m, sub).p) for sub in ("dropout", "dropout1", "dropout2"))])


_BUILTIN = refused(f"no builtin-ops backward pass for attention; use the flex variant or {SERVER}")
_DROPOUT = ("dropout > 0 trains (Dropout's seeded hash masks, one stream per dropout site; not bit-comparable "
            "with torch; checked to converge, test_seq_ops.py)")
register(
    OpSpec(
        "MultiheadAttention", "attention", modules=("MultiheadAttention",),
        onnx=native("MatMul / Softmax (a scripted layer is rebuilt in Python before export); dropout > 0 trains: "
                    "ORT draws the masks in the last segment; before the server the layer is written out per head "
                    "with mask inputs (not bit-comparable with torch; checked to converge, test_onnx_ops.py)"),
        tfjs=native(f"SplitexportLayer 'attention' (layers.js); {_DROPOUT}"),
        tflite_flex=native(f"matmul + softmax, GradientTape; {_DROPOUT}"), tflite_builtin=_BUILTIN,
        restrictions="batch_first self-attention attn(x, x, x)[0]; no masks, bias_k/v, add_zero_attn; any dropout "
                     "(not bit-comparable with torch when > 0)",
        build_module=_build_mha, kinds=("attention",),
    ),
    OpSpec(
        "TransformerEncoderLayer", "attention", modules=("TransformerEncoderLayer",),
        onnx=native("MatMul / Softmax / LayerNormalization (a scripted layer is rebuilt in Python before export); "
                    "dropout > 0 trains: ORT draws the masks in the last segment; before the server the layer is "
                    "written out with mask inputs (batch_first only; not bit-comparable with torch; checked to "
                    "converge, test_onnx_ops.py)"),
        tfjs=native(f"SplitexportLayer 'encoder' (layers.js); {_DROPOUT}"),
        tflite_flex=native(f"attention + LayerNorm + feed-forward, GradientTape; {_DROPOUT}"),
        tflite_builtin=_BUILTIN,
        restrictions="batch_first; activation relu or gelu; norm_first either; no masks; any dropout (attention, "
                     "feed-forward, residual branches; not bit-comparable with torch when > 0)",
        build_module=_build_encoder, kinds=("encoder",),
    ),
    LayerKind("attention", keras_seq, forward_seq, _no_builtin_backward, builtin_refusal=_refusal("attention"),
              after_step=advance_seed),
    LayerKind("encoder", keras_seq, forward_seq, _no_builtin_backward,
              builtin_refusal=_refusal("the transformer encoder layer"), after_step=advance_seed),
)
