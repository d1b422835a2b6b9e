"""A zoo of tiny modern models the project was not built around (issue 10).

Each entry is a :class:`ZooModel`: a factory (importable as ``--arch tests.zoo:<name>`` with
the repository root on ``PYTHONPATH``), the per-sample input shape and dtype, the loss, a
deterministic data generator, and cuts that put the interesting layers in A and in C.
Models are tiny (few channels, 3x16x16 images, 8 or 16 tokens over a vocabulary of 50) so that
exporting and training them in tests takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from splitexport._update_rule import LossKind

IMAGE = (3, 16, 16)
SEQ_LEN = 8
TEXT_LEN = 16
"""The transformer's sequence length (``--input-shape 1,16 --input-dtype int64``)."""
VOCAB = 50
SEQ_FEATURES = 6
TABULAR_FEATURES = 10


# --------------------------------------------------------------------------- building blocks


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project (BN, ReLU6); residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, expand: int = 2) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = nn.Sequential(nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class SqueezeExcite(nn.Module):
    """Global average pool, 1x1 reduce, ReLU, 1x1 expand, Hardsigmoid, then an elementwise multiply."""

    def __init__(self, ch: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(ch, reduced, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(reduced, ch, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class V3Block(nn.Module):
    """MobileNetV3 block: depthwise conv, GroupNorm, activation, squeeze-excite, pointwise conv, GroupNorm."""

    def __init__(self, in_ch: int, out_ch: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False)
        self.norm1 = nn.GroupNorm(2, in_ch)
        self.act = act()
        self.se = SqueezeExcite(in_ch, max(in_ch // 4, 2))
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.norm2 = nn.GroupNorm(2, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.pointwise(self.se(self.act(self.norm1(self.depthwise(x))))))


class DenseLayer(nn.Module):
    """BN, ReLU, 3x3 conv to ``growth`` channels, concatenated to the input."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_ch, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], dim=1)


class PositionalEmbedding(nn.Module):
    """A learned position vector added to each token's embedding (``N x T x D``)."""

    def __init__(self, seq_len: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, seq_len, dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class MeanPool(nn.Module):
    """Mean over the sequence axis: ``N x T x D`` -> ``N x D``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class RNNBlock(nn.Module):
    """A single-layer batch-first GRU or LSTM returning its output sequence (``N x T x H``)."""

    def __init__(self, kind: str, in_features: int, hidden: int) -> None:
        super().__init__()
        cls = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]
        self.rnn = cls(in_features, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- models


class MobileNetV2Tiny(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.block1 = InvertedResidual(8, 8)
        self.block2 = InvertedResidual(8, 12, stride=2)
        self.block3 = InvertedResidual(12, 12)
        self.head = nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block3(self.block2(self.block1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


class MobileNetV3Tiny(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8), nn.Hardswish())
        self.block1 = V3Block(8, 8, nn.Hardswish)
        self.pool1 = nn.AvgPool2d(2)
        self.block2 = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.SiLU())
        self.block3 = V3Block(12, 12, nn.SiLU)
        self.pool2 = nn.AvgPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.Hardswish()
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(self.stem(x)))
        x = self.pool2(self.block3(self.block2(x)))
        return self.fc2(self.act(self.fc1(self.flatten(self.pool(x)))))


class DenseNetTiny(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dense1 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.trans1 = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.MaxPool2d(2))
        self.dense2 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.norm = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense2(self.trans1(self.dense1(self.stem(x))))
        return self.fc(self.flatten(self.pool(self.relu(self.norm(x)))))


class TransformerClassifier(nn.Module):
    def __init__(self, num_classes: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = PositionalEmbedding(TEXT_LEN, dim)
        self.enc1 = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.mid = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"))
        self.enc2 = nn.TransformerEncoderLayer(
            dim, 2, dim_feedforward=32, dropout=0.0, activation="gelu", batch_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.pool = MeanPool()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.enc1(self.pos(self.embed(ids)))
        x = self.enc2(self.mid(x))
        return self.fc(self.pool(self.norm(x)))


class GRUClassifier(nn.Module):
    def __init__(self, num_classes: int = 2, hidden: int = 12) -> None:
        super().__init__()
        self.proj = nn.Linear(SEQ_FEATURES, hidden)
        self.rnn1 = RNNBlock("gru", hidden, hidden)
        self.mid = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.rnn2 = RNNBlock("gru", hidden, hidden)
        self.pool = MeanPool()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.rnn2(self.mid(self.rnn1(self.proj(x))))))


class LSTMClassifier(nn.Module):
    def __init__(self, num_classes: int = 2, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.rnn1 = RNNBlock("lstm", dim, dim)
        self.mid = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.rnn2 = RNNBlock("lstm", dim, dim)
        self.pool = MeanPool()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.rnn2(self.mid(self.rnn1(self.embed(ids))))))


class TabularMLP(nn.Module):
    def __init__(self, outputs: int = 2, hidden: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Linear(TABULAR_FEATURES, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout)
        )
        self.block2 = nn.Sequential(nn.Linear(hidden, hidden), nn.LeakyReLU(0.1))
        self.block3 = nn.Sequential(
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.block2(self.block1(x)))  # type: ignore[no-any-return]


def mobilenet_v2() -> nn.Module:
    """MobileNetV2-style: ReLU6, depthwise convs, inverted residuals, BatchNorm (3x16x16, 4 classes)."""
    return MobileNetV2Tiny()


def mobilenet_v3() -> nn.Module:
    """MobileNetV3-style: Hardswish, GroupNorm, squeeze-excite (mul, Hardsigmoid), AvgPool2d, SiLU."""
    return MobileNetV3Tiny()


def densenet() -> nn.Module:
    """DenseNet-style: channel concatenation, BatchNorm, MaxPool (3x16x16, 4 classes)."""
    return DenseNetTiny()


def transformer() -> nn.Module:
    """Text classifier over int64 token ids (16 tokens, vocabulary 50): two TransformerEncoderLayers."""
    return TransformerClassifier()


def gru() -> nn.Module:
    """GRU classifier over float sequences (N x 8 x 6), one GRU in A and one in C."""
    return GRUClassifier()


def lstm() -> nn.Module:
    """LSTM classifier over int64 token ids, one LSTM in A and one in C."""
    return LSTMClassifier()


def tabular_mlp() -> nn.Module:
    """Tabular regression MLP (10 features -> 2 targets, MSE) with LayerNorm and Dropout(0.1)."""
    return TabularMLP()


def tabular_mlp_p0() -> nn.Module:
    """The tabular MLP with Dropout p=0 (for exact comparisons with torch)."""
    return without_dropout(TabularMLP())


# --------------------------------------------------------------------------- data


def _images(n: int, seed: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent patterns plus noise."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn((classes, *IMAGE), generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, classes, (n,), generator=gen)
    x = 0.7 * patterns[y] + torch.randn((n, *IMAGE), generator=gen)
    return x, y


def _tokens(n: int, seed: int, length: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 1 when most tokens come from the lower half of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=gen)
    y = ((ids < VOCAB // 2).sum(dim=1) * 2 > length).long()
    return ids, y


def _text(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _tokens(n, seed, TEXT_LEN)


def _sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 1 when the first feature sums to a positive value over time."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, SEQ_LEN, SEQ_FEATURES), generator=gen)
    return x, (x[:, :, 0].sum(dim=1) > 0).long()


def _tabular(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth targets of a fixed random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn((TABULAR_FEATURES, 2), generator=torch.Generator().manual_seed(4321)) / 3
    x = torch.randn((n, TABULAR_FEATURES), generator=gen)
    return x, torch.tanh(x @ teacher)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ZooModel:
    """A zoo model with what a test needs to partition, train and export it."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    """Per sample (without the batch dimension)."""
    dtype: torch.dtype
    loss: LossKind
    data: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    """``data(n, seed) -> (x, y)``, deterministic."""
    cuts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``"double"`` (A|B|C) and, where it is relevant, ``"single"`` (A|B)."""
    dropout: bool = False
    """Has Dropout layers (trains on the device, not bit-comparable with torch)."""

    @property
    def arch(self) -> str:
        """The ``--arch`` value for the CLI (needs the repository root on ``PYTHONPATH``)."""
        return f"tests.zoo:{self.name}"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def example(self, batch: int = 2) -> torch.Tensor:
        """A real example input of the model's dtype (token ids for token models)."""
        return self.data(batch, 99)[0]

    def cli_input_shape(self, batch: int = 1) -> str:
        return ",".join(str(d) for d in (batch, *self.input_shape))


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "mobilenet_v2",
            mobilenet_v2,
            IMAGE,
            torch.float32,
            "cross_entropy",
            _images,
            {"double": ("block1", "block2"), "single": ("block1",)},
        ),
        ZooModel(
            "mobilenet_v3",
            mobilenet_v3,
            IMAGE,
            torch.float32,
            "cross_entropy",
            _images,
            {"double": ("pool1", "block2"), "single": ("pool1",)},
        ),
        ZooModel(
            "densenet",
            densenet,
            IMAGE,
            torch.float32,
            "cross_entropy",
            _images,
            {"double": ("dense1", "trans1"), "single": ("dense1",)},
        ),
        ZooModel(
            "transformer",
            transformer,
            (TEXT_LEN,),
            torch.int64,
            "cross_entropy",
            _text,
            {"double": ("enc1", "mid"), "single": ("enc1",)},
        ),
        ZooModel(
            "gru",
            gru,
            (SEQ_LEN, SEQ_FEATURES),
            torch.float32,
            "cross_entropy",
            _sequences,
            {"double": ("rnn1", "mid"), "single": ("rnn1",)},
        ),
        ZooModel(
            "lstm",
            lstm,
            (SEQ_LEN,),
            torch.int64,
            "cross_entropy",
            _tokens,
            {"double": ("rnn1", "mid"), "single": ("rnn1",)},
        ),
        ZooModel(
            "tabular_mlp",
            tabular_mlp,
            (TABULAR_FEATURES,),
            torch.float32,
            "mse",
            _tabular,
            {"double": ("block1", "block2"), "single": ("block1",)},
            dropout=True,
        ),
    )
}
"""Every zoo model by name."""


def without_dropout(model: nn.Module) -> nn.Module:
    """Set every Dropout's probability to 0 in place (for exact comparisons) and return the model."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model
