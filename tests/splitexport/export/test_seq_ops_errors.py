"""Sequence layers the TF.js / TFLite export cannot train: one line naming the layer, the op and the way out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from splitexport._errors import ExportError
from splitexport.export._layergraph import layer_graph

D = 8


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0] if isinstance(self.layer, (nn.GRU, nn.LSTM)) else self.layer(x)


class HiddenState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(D, D, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(x)
        return h


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.kv = nn.GRU(D, D, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv(x)[0]
        return self.attn(x, kv, kv)[0]


class AttentionWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[1]


class BadPositional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, D)
        self.pos = nn.Parameter(torch.zeros(1, 7, D))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) + self.pos


SEQ = (4, 5, D)
IDS = (4, 5)

CASES = [
    ("gru_two_layers", Wrap(nn.GRU(D, D, num_layers=2, batch_first=True)), SEQ, "float32",
     (r"^layer 'layer' \(GRU\): only single-layer, unidirectional GRU .*stack single-layer GRUs or cut so that it runs "
     r"on the server$")),
    ("lstm_bidirectional", Wrap(nn.LSTM(D, D, bidirectional=True, batch_first=True)), SEQ, "float32",
     r"^layer 'layer' \(LSTM\): only single-layer, unidirectional LSTM"),
    ("gru_not_batch_first", Wrap(nn.GRU(D, D)), SEQ, "float32", r"^layer 'layer' \(GRU\): .*batch_first=True"),
    ("lstm_hidden_state", HiddenState(), SEQ, "float32",
     (r"^the segment output '\w+': only the output sequence of LSTM \(rnn\(x\)\[0\]\) is supported, not its final "
     r"state; use output\[:, -1\] or pool the output$")),
    ("cross_attention", CrossAttention(), SEQ, "float32",
     (r"^layer 'attn' \(MultiheadAttention\): called with further tensor arguments \(masks, states or distinct q / k "
     r"/ v\); only calls on one tensor are supported: cut so that it runs on the server$")),
    ("attention_weights", AttentionWeights(), SEQ, "float32",
     r"^the segment output '\w+': only the output of MultiheadAttention"),
    ("encoder_not_batch_first", Wrap(nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0)), SEQ, "float32",
     r"^layer 'layer' \(TransformerEncoderLayer\): only batch_first attention"),
    ("embedding_padding_idx", Wrap(nn.Embedding(10, D, padding_idx=0)), IDS, "int64",
     r"^layer 'layer' \(Embedding\): Embedding with padding_idx is not supported"),
    ("embedding_float_input", Wrap(nn.Embedding(10, D)), (4, 5), "float32",
     (r"^layer 'layer' \(Embedding\): Embedding needs integer ids N x T as the segment input \(partition with "
     r"--input-dtype int64")),
    ("positional_shape", BadPositional(), IDS, "int64",
     r"^node 'add' \(add\): adding 'pos' of shape \(1, 7, 8\) to a sequence of shape \(N, 5, 8\) is not supported"),
]


def _scripted(module: nn.Module) -> torch.jit.ScriptModule:
    """The TorchScript copy a bundle stores (fx's type annotations dropped, as ``partition`` does)."""
    gm = fx.symbolic_trace(module)
    for n in gm.graph.nodes:
        n.type = None
    gm.recompile()
    return torch.jit.script(gm)


@pytest.mark.parametrize(("name", "module", "shape", "dtype", "message"), CASES, ids=[c[0] for c in CASES])
def test_unsupported_sequence_layer_is_one_line(name: str, module: nn.Module, shape: tuple[int, ...], dtype: str,
                                                message: str) -> None:
    for segment in (fx.symbolic_trace(module), _scripted(module)):
        with pytest.raises(ExportError, match=message) as err:
            layer_graph(segment, shape, dtype)
        assert "\n" not in str(err.value)


def test_integer_ids_cannot_feed_the_last_segment(tmp_path: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pytest.importorskip("tensorflow")
    from splitexport.export._tflite import export_tflite_segment

    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, D)
            self.pos = nn.Parameter(torch.zeros(5, D))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids) + self.pos

    with pytest.raises(ExportError, match="^the last segment cannot take integer ids"):
        export_tflite_segment(fx.symbolic_trace(Pool()), IDS, tmp_path, is_last=True, loss="mse",
                              input_dtype="int64", variants=("flex",))  # type: ignore[call-arg]
    assert not list(tmp_path.iterdir())


def test_tflite_runtime_takes_int64_ids_and_refuses_floats(tmp_path: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pytest.importorskip("tensorflow")
    from device_runtime._tflite import TfliteRuntimeError, TfliteSegment
    from splitexport.export._tflite import export_tflite_segment

    torch.manual_seed(0)
    emb = Wrap(nn.Embedding(10, D))
    export_tflite_segment(fx.symbolic_trace(emb), IDS, tmp_path, is_last=False,
                          input_dtype="int64", variants=("flex",))  # type: ignore[call-arg]
    seg = TfliteSegment.from_directory(tmp_path, variant="flex")
    ids = np.array([[1, 2, 3, 4, 9]] * 4, dtype=np.int64)
    assert np.array_equal(seg.forward(ids), emb(torch.from_numpy(ids)).detach().numpy())
    with pytest.raises(TfliteRuntimeError, match="takes integer ids"):
        seg.forward(ids.astype(np.float32))
    with pytest.raises(TfliteRuntimeError, match="outside the int32 range"):
        seg.forward(ids * 2**40)

    # the split trainer's runner keeps torch int64 ids integer through forward and the aux-loss step
    from device_runtime._tflite_runner import TfliteRunner

    runner = TfliteRunner(seg)
    out = runner.forward(torch.from_numpy(ids))
    assert out.dtype == torch.float32 and out.shape == (4, 5, D)
    before = runner.state_dict()["layer.weight"].clone()
    assert runner.train_with_gradient(torch.ones(4, 5, D)) is None
    moved = (runner.state_dict()["layer.weight"] != before).any(dim=1)
    assert moved.tolist() == [i in (1, 2, 3, 4, 9) for i in range(10)]  # only the rows of the ids seen


@pytest.mark.parametrize("name", ["seq_embed_param", "seq_embed_arange", "seq_gru_A", "seq_lstm_C", "seq_attention_A",
                                  "seq_encoder_gelu_nf_C", "seq_text_A"])
def test_the_torchscript_copy_maps_like_fx(name: str) -> None:
    """A bundle stores TorchScript: it must give the same layers and torch weights as the fx module."""
    from tests.splitexport.export.seq_cases import SEQ_CASES
    from tests.tf_reference import segment_of

    case = next(c for c in SEQ_CASES if c.name == name)
    module, shape, _ = segment_of(case)
    eager, scripted = layer_graph(module, shape, case.input_dtype), layer_graph(_scripted(module), shape,
                                                                                 case.input_dtype)
    assert [lyr.kind for lyr in scripted.layers] == [lyr.kind for lyr in eager.layers]
    assert sorted(t for t, _ in scripted.torch_name_map().values()) == sorted(
        t for t, _ in eager.torch_name_map().values())
    weights = {t: w for lyr in eager.layers for k, w in lyr.weights.items() for t in [lyr.torch_names[k]]}
    for lyr in scripted.layers:
        for k, w in lyr.weights.items():
            assert np.array_equal(w, weights[lyr.torch_names[k]])
