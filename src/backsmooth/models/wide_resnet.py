"""WideResNet (Zagoruyko & Komodakis 2016); WRN-34-10 is the TRADES / Backward Smoothing model."""

import torch
import torch.nn.functional as F
from torch import nn

from backsmooth.models.preact_resnet import PreActBlock


class WideResNet(nn.Module):
    """WRN-depth-width: three groups of (depth - 4) / 6 pre-activation blocks (the same block as PreAct-ResNet)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 34, width: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 (for example 28 or 34), got {depth}")
        blocks = (depth - 4) // 6
        channels = (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        layers, in_planes = [], channels[0]
        for planes, stride in zip(channels[1:], (1, 2, 2)):
            for i in range(blocks):
                layers.append(PreActBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
