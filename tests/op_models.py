"""Small models that together hold every non-sequence op of the op table (tests of issue 10).

Each is traced with torch.fx and trained as one device segment, on labels (C) and on a
received gradient (A), in TF.js, TFLite flex and TFLite builtin (see test_op_coverage.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BATCH = 16


class Activations(nn.Module):
    """N x F: every activation (ReLU6, LeakyReLU, SiLU, Hardswish, Hardsigmoid, GELU tanh, Sigmoid, Tanh) on its
    own Linear branch of a shared trunk, inputs spread over their kinks (about +-6), the branches concatenated
    into LayerNorm and a Linear head: every activation's gradient reaches the output undamped."""

    def __init__(self) -> None:
        super().__init__()
        acts: list[nn.Module] = [nn.ReLU6(), nn.LeakyReLU(0.1), nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid(),
                                 nn.GELU(approximate="tanh"), nn.Sigmoid(), nn.Tanh()]
        self.trunk = nn.Linear(12, 16)
        fcs = [nn.Linear(16, 6) for _ in acts]
        for fc in fcs:
            nn.init.uniform_(fc.weight, -1.5, 1.5)
        self.fcs = nn.ModuleList(fcs)
        self.acts = nn.ModuleList(acts)
        self.norm = nn.LayerNorm(6 * len(acts))
        self.out = nn.Linear(6 * len(acts), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return self.out(self.norm(torch.cat([act(fc(h)) for fc, act in zip(self.fcs, self.acts)], dim=1)))


class Sequence(nn.Module):
    """N x T x F: Linear on the last axis, LayerNorm, GELU (tanh), Dropout(0), mean over T, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.act = nn.GELU(approximate="tanh")
        self.mix = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.act(self.norm(self.proj(x))))
        return self.fc(h.mean(dim=1) + torch.sum(h, 1) * torch.sigmoid(h.mean(1)))


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(ch, 4, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(4, ch, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class Convs(nn.Module):
    """N x 3 x 12 x 12: strided conv, GroupNorm, Hardswish, squeeze-excite (mul), depthwise conv, BatchNorm2d,
    ReLU6, AvgPool2d (kernel 2 and kernel 3 stride 1), cat, mean over H and W, sum over C, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.act = nn.Hardswish()
        self.se = SqueezeExcite(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu6 = nn.ReLU6()
        self.pool = nn.AvgPool2d(2)
        self.pool3 = nn.AvgPool2d(3, stride=1)
        self.side = nn.Conv2d(8, 4, 2)
        self.silu = nn.SiLU()
        self.fc = nn.Linear(12 + 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.se(self.act(self.gn(self.conv(x))))
        h = self.relu6(self.bn(self.dw(h)))
        p = self.pool(h)  # 8 x 3 x 3
        s = self.silu(self.side(self.pool3(h)))  # 6x6 -> 4x4 -> 4 x 3 x 3
        h = torch.cat([p, s], dim=1)
        feats = h.mean(dim=(2, 3))
        spatial = torch.flatten(h.sum(dim=1, keepdim=True), 1)
        return self.fc(torch.cat([feats, spatial], dim=1))


class Shapes(nn.Module):
    """N x 4 x 10 sequences: Conv1d, BatchNorm1d (N x C x L), depthwise Conv1d, transpose, Linear on N x T x F,
    matmul (attention-like, with Softmax), permute and view back to N x F."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.relu = nn.ReLU()
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.proj = nn.Linear(8, 8)
        self.soft = nn.Softmax(dim=-1)
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.relu(self.bn(self.conv(x))))  # N x 8 x 5
        t = self.proj(h.transpose(1, 2))  # N x 5 x 8
        att = self.soft(torch.matmul(t, t.transpose(1, 2)) * torch.sigmoid(t.mean(-1, keepdim=True)))  # N x 5 x 5
        out = torch.matmul(att, t).permute(0, 2, 1)  # N x 8 x 5
        return self.fc(out.reshape(out.size(0), -1))


class ImageShapes(nn.Module):
    """N x 3 x 6 x 6 images: view to N x F, reshape to N x C x HW + transpose to tokens, mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.tok = nn.Linear(4, 6)
        self.fc = nn.Linear(4 * 36 + 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        flat = h.view(h.size(0), -1)
        tokens = self.tok(h.reshape(-1, 4, 36).transpose(1, 2)).mean(dim=1)
        return self.fc(torch.cat([flat, tokens], dim=1))


class GroupedConvs(nn.Module):
    """N x 4 x 12 x 12: grouped conv (groups 2), dilated conv, strided + dilated grouped conv with 'same'-style
    padding, dilated depthwise conv (multiplier 2), and a grouped dilated Conv1d over the rows."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.both = nn.Conv2d(8, 12, (3, 2), stride=2, padding=(2, 1), dilation=(2, 3), groups=4)
        self.dw = nn.Conv2d(12, 24, 3, padding="same", dilation=2, groups=12)
        self.conv1d = nn.Conv1d(24, 8, 3, dilation=2, groups=4)
        self.fc = nn.Linear(8 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.grouped(x))
        h = torch.relu(self.dilated(h)) + h
        h = self.dw(torch.sigmoid(self.both(h)))  # N x 24 x 6 x 6
        h = self.conv1d(torch.tanh(h.reshape(h.size(0), 24, -1)))  # N x 8 x 32
        return self.fc(h.reshape(h.size(0), -1))


class TwoDropouts(nn.Module):
    """Two Dropout(0.5) layers of the same shape in one segment: ``cat(d1(fc(x)), d2(fc(x)))``, N x 12 -> N x 32.
    The sent activation divided by ``cat(fc(x), fc(x))`` is the two masks (not a member of :data:`MODELS`:
    dropout is not bit-comparable with torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.d1 = nn.Dropout(0.5)
        self.d2 = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.cat([self.d1(h), self.d2(h)], 1)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "activations": (Activations, (BATCH, 12)),
    "sequence": (Sequence, (BATCH, 5, 6)),
    "convs": (Convs, (BATCH, 3, 12, 12)),
    "shapes": (Shapes, (BATCH, 4, 10)),
    "image_shapes": (ImageShapes, (BATCH, 3, 6, 6)),
    "grouped_convs": (GroupedConvs, (BATCH, 4, 12, 12)),
}
