"""Example models (there is no CPU torchvision here): ResNet-style, MobileNet-style, MLP.

Each factory is importable as ``--arch splitexport.models:<name>``. All take the
digits images as ``N x 1 x 8 x 8`` and return 10 logits by default.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FACTORIES", "MLP", "MobileNetCNN", "ResNetCNN", "ResidualBlock", "mlp", "mobilenet_cnn", "resnet_cnn"]


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) skip connection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """A small ResNet: stem, three residual stages, global average pool, classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = ResidualBlock(width, width)
        self.layer2 = ResidualBlock(width, 2 * width, stride=2)
        self.layer3 = ResidualBlock(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU followed by pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.depthwise(x)))
        return self.relu2(self.bn2(self.pointwise(x)))


class MobileNetCNN(nn.Module):
    """A small MobileNet-style CNN built from depthwise-separable blocks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block1 = DepthwiseSeparable(width, 2 * width)
        self.block2 = DepthwiseSeparable(2 * width, 4 * width, stride=2)
        self.block3 = DepthwiseSeparable(4 * width, 4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


class MLP(nn.Module):
    """Flatten, then three linear layers with ReLU between them."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))


def resnet_cnn(num_classes: int = 10) -> ResNetCNN:
    """ResNet-style CNN for 1x8x8 inputs."""
    return ResNetCNN(num_classes=num_classes)


def mobilenet_cnn(num_classes: int = 10) -> MobileNetCNN:
    """MobileNet-style CNN for 1x8x8 inputs."""
    return MobileNetCNN(num_classes=num_classes)


def mlp(num_classes: int = 10) -> MLP:
    """MLP for 1x8x8 (64-feature) inputs."""
    return MLP(num_classes=num_classes)


FACTORIES = {"resnet_cnn": resnet_cnn, "mobilenet_cnn": mobilenet_cnn, "mlp": mlp}
"""Example factories by name; the default cuts for each are in :data:`DEFAULT_CUTS`."""

DEFAULT_CUTS: dict[str, tuple[str, ...]] = {
    "resnet_cnn": ("layer1", "layer3"),
    "mobilenet_cnn": ("block1", "block3"),
    "mlp": ("relu1", "relu2"),
}
