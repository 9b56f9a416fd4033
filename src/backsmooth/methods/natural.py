"""Natural training: loss = CE(f(x), y). The speed and accuracy baseline."""

import dataclasses

import torch
from torch import Tensor, nn

from backsmooth.methods.base import Stats, TrainingMethod, ce_training_loss


@dataclasses.dataclass(frozen=True)
class Natural(TrainingMethod):
    name = "natural"
    summary = "plain cross-entropy; no robustness, the speed and clean-accuracy baseline"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None) -> Tensor:
        return ce_training_loss(model, x, y, stats)
