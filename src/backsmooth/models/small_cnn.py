"""A small CNN with BatchNorm for digits, MNIST and CPU-scale CIFAR experiments; any input size."""

import torch
from torch import nn


def _conv(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


class SmallCNN(nn.Module):
    """conv32 - conv64/2 - conv128/2 - pool to 4x4 - fc256 - fc(classes): about 0.6M parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(in_channels, 32, 1), _conv(32, 64, 2), _conv(64, 128, 2), nn.AdaptiveAvgPool2d(4)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
