"""Sequence-layer equivalence cases (Embedding, positional tables, GRU, LSTM, attention, encoder layers).

Whole-model cases of :mod:`tests.tf_reference` (``model``, ``input_shape``); the TFLite and TF.js
tests in ``test_seq_ops*.py`` compare the exported segments with torch's run.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.tf_reference import BATCH, Case

T, D, F, VOCAB = 5, 8, 6, 12


class EmbedParam(nn.Module):
    """Token ids -> Embedding + a learned (1, T, D) positional parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(1, T, D) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos


class EmbedArange(nn.Module):
    """Token ids -> Embedding + Embedding(arange(T)) with more rows than positions."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T + 2, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))


class Rnn(nn.Module):
    def __init__(self, cls: type[nn.GRU | nn.LSTM]) -> None:
        super().__init__()
        self.rnn = cls(F, D, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return out


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Encoder(nn.Module):
    def __init__(self, activation: str, norm_first: bool) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, activation=activation, batch_first=True,
                                              norm_first=norm_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


class TextEncoder(nn.Module):
    """Ids -> Embedding + positional -> encoder layer -> GRU: the integer-input first segment of a text model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = EmbedArange()
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, activation="gelu", batch_first=True)
        self.gru = nn.GRU(D, D, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gru(self.enc(self.emb(ids)))[0]


IDS = (BATCH, T)
SEQ = (BATCH, T, F)
EMB = (BATCH, T, D)

MOMENTUM = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
ADAM = {"name": "adam", "lr": 0.01}

SEQ_CASES = [
    Case("seq_embed_param", "", model=EmbedParam, input_shape=IDS, is_last=False, optimizer=MOMENTUM,
         input_dtype="int64", vocab=VOCAB),
    Case("seq_embed_arange", "", model=EmbedArange, input_shape=IDS, is_last=False, optimizer=ADAM,
         input_dtype="int64", vocab=VOCAB),
    Case("seq_gru_A", "", model=lambda: Rnn(nn.GRU), input_shape=SEQ, is_last=False, builtin=False),
    Case("seq_gru_C", "", model=lambda: Rnn(nn.GRU), input_shape=SEQ, is_last=True, builtin=False, loss="mse"),
    Case("seq_lstm_A", "", model=lambda: Rnn(nn.LSTM), input_shape=SEQ, is_last=False, builtin=False,
         optimizer=MOMENTUM),
    Case("seq_lstm_C", "", model=lambda: Rnn(nn.LSTM), input_shape=SEQ, is_last=True, builtin=False, loss="mse"),
    Case("seq_attention_A", "", model=SelfAttention, input_shape=EMB, is_last=False, builtin=False),
    Case("seq_attention_C", "", model=SelfAttention, input_shape=EMB, is_last=True, builtin=False, loss="mse"),
    # not Adam: the key bias's gradient is 0 in exact arithmetic (softmax ignores a per-query constant), so Adam
    # normalises float noise of ~1e-10 into lr-sized steps in torch and on the device alike (measured 1.6e-4 apart)
    Case("seq_encoder_relu_A", "", model=lambda: Encoder("relu", False), input_shape=EMB, is_last=False,
         builtin=False, optimizer=MOMENTUM),
    Case("seq_encoder_gelu_nf_C", "", model=lambda: Encoder("gelu", True), input_shape=EMB, is_last=True,
         builtin=False, loss="mse"),
    Case("seq_text_A", "", model=TextEncoder, input_shape=IDS, is_last=False, builtin=False, input_dtype="int64",
         vocab=VOCAB),
]
"""``builtin``: whether the builtin-ops TFLite variant trains it (else it must refuse at export)."""
