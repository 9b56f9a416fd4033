"""A small CNN with BatchNorm for digits, MNIST and CPU-scale CIFAR experiments; any input size."""

import torch
from torch import nn


def _conv(in_ch: int, out_ch: int, stride: int, norm: str) -> nn.Sequential:
    layer = nn.BatchNorm2d(out_ch) if norm == "batch" else nn.GroupNorm(8, out_ch)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), layer, nn.ReLU())


class SmallCNN(nn.Module):
    """conv32 - conv64/2 - conv128/2 - pool to 4x4 - fc256 - fc(classes): about 0.6M parameters.

    norm="group" swaps BatchNorm for GroupNorm: no batch statistics, so a model whose output per
    example does not depend on the rest of the batch (exact comparisons across process counts).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        self.features = nn.Sequential(
            _conv(in_channels, 32, 1, norm), _conv(32, 64, 2, norm), _conv(64, 128, 2, norm), nn.AdaptiveAvgPool2d(4)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
