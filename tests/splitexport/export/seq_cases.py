"""Sequence-layer equivalence cases (Embedding, positional tables, GRU, LSTM, attention, encoder layers).

Registered in :data:`tests.tf_reference.ARCHES` so the shared torch reference trains them; the
TFLite and TF.js tests in ``test_seq_ops*.py`` compare the exported segments with it.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.tf_reference import ARCHES, BATCH, Case

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

ARCHES.update(
    {
        "seq_embed_param": (EmbedParam, IDS, False),
        "seq_embed_arange": (EmbedArange, IDS, False),
        "seq_gru_A": (lambda: Rnn(nn.GRU), SEQ, False),
        "seq_gru_C": (lambda: Rnn(nn.GRU), SEQ, True),
        "seq_lstm_A": (lambda: Rnn(nn.LSTM), SEQ, False),
        "seq_lstm_C": (lambda: Rnn(nn.LSTM), SEQ, True),
        "seq_attention_A": (SelfAttention, EMB, False),
        "seq_attention_C": (SelfAttention, EMB, True),
        "seq_encoder_relu_A": (lambda: Encoder("relu", False), EMB, False),
        "seq_encoder_gelu_nf_C": (lambda: Encoder("gelu", True), EMB, True),
        "seq_text_A": (TextEncoder, IDS, False),
    }
)

MOMENTUM = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
ADAM = {"name": "adam", "lr": 0.01}

SEQ_CASES = [
    Case("seq_embed_param", "seq_embed_param", optimizer=MOMENTUM, input_dtype="int64", vocab=VOCAB),
    Case("seq_embed_arange", "seq_embed_arange", optimizer=ADAM, input_dtype="int64", vocab=VOCAB),
    Case("seq_gru_A", "seq_gru_A", builtin=False),
    Case("seq_gru_C", "seq_gru_C", builtin=False, loss="mse"),
    Case("seq_lstm_A", "seq_lstm_A", builtin=False, optimizer=MOMENTUM),
    Case("seq_lstm_C", "seq_lstm_C", builtin=False, loss="mse"),
    Case("seq_attention_A", "seq_attention_A", builtin=False),
    Case("seq_attention_C", "seq_attention_C", builtin=False, loss="mse"),
    # not Adam: the key bias's gradient is 0 in exact arithmetic (softmax ignores a per-query constant), so Adam
    # normalises float noise of ~1e-10 into lr-sized steps in torch and on the device alike (measured 1.6e-4 apart)
    Case("seq_encoder_relu_A", "seq_encoder_relu_A", builtin=False, optimizer=MOMENTUM),
    Case("seq_encoder_gelu_nf_C", "seq_encoder_gelu_nf_C", builtin=False, loss="mse"),
    Case("seq_text_A", "seq_text_A", builtin=False, input_dtype="int64", vocab=VOCAB),
]
"""``builtin``: whether the builtin-ops TFLite variant trains it (else it must refuse at export)."""
